"""Variable kinds beyond `nnx.Param`, and the flat view of a module's variables."""

from __future__ import annotations

from flax import nnx


class Buffer(nnx.Variable):
    """A stored, non-trainable tensor (Fourier frequencies, normalisation statistics).

    Checkpoints carry these, in the checkpoint's dtype, so they are loaded rather than recomputed;
    gradients taken with respect to `nnx.Param` leave them alone.
    """


def module_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    """'a.b.kernel' -> the `nnx.Param` or `Buffer` at that path (concrete or abstract module)."""
    state = nnx.state(module, nnx.Any(nnx.Param, Buffer))
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}
