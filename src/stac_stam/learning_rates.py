"""How STAC splits its public learning rate between the roles; the same in PyTorch and JAX (no framework import).

When the model has both a trunk and a cap, the cap steps at ``lr`` and the sign
trunk at ``SIGN_LR_SCALE * lr`` (the seeds' rule); with no cap the trunk steps
at ``lr``. ``STAC.recommended`` / ``stac_recommended`` use
``RECOMMENDED_SIGN_LR_SCALE`` instead, with the "snr" step scale that
shrinks each tensor's sign step to AdamW's average step size.
``STAC.compact`` / ``stac_compact`` step their factored trunk at
``COMPACT_SIGN_LR_SCALE * lr``: its momentum of a clipped normalized step
wants a larger rate than the AdamW cap (at the cap's rate the residual
regression ended 6% behind AdamW; at 3x it ties, and digits improve).
"""

SIGN_LR_SCALE = 0.75
RECOMMENDED_SIGN_LR_SCALE = 3.0
COMPACT_SIGN_LR_SCALE = 3.0
