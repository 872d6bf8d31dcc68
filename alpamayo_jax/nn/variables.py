"""Variable kinds beyond `nnx.Param`."""

from flax import nnx


class Buffer(nnx.Variable):
    """A stored, non-trainable tensor (Fourier frequencies, normalisation statistics).

    Checkpoints carry these, in the checkpoint's dtype, so they are loaded rather than recomputed;
    gradients taken with respect to `nnx.Param` leave them alone.
    """
