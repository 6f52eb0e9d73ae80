"""The Triton interpreter patched for jax_ep's CPU kernel tests (Triton 3.6; not a test file).

``patch_interpreter(monkeypatch)`` makes kernels loaded with TRITON_INTERPRET=1 run here, for one
test (monkeypatch undoes everything), and returns ``triton.runtime.interpreter`` for further
patches of the caller's own.
"""
from __future__ import annotations

import numpy as np


def patch_interpreter(monkeypatch):
  import triton
  import triton.language as tl
  from triton.runtime import interpreter as ti
  try:  # the interpreter imports gluon lazily; it must see the unpatched triton.language
    import triton.experimental.gluon.language  # noqa: F401
  except ImportError:
    pass
  # Triton 3.6 turns a run-time scalar into an int with int(1-element array), which numpy >= 2.5
  # refuses (``range(world)`` in a kernel); take the element instead.
  orig = ti._patch_lang_tensor

  def patch_tensor(tensor, scope):
    orig(tensor, scope)
    scope.set_attr(tensor, "__index__",
                   lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

  monkeypatch.setattr(ti, "_patch_lang_tensor", patch_tensor)
  # triton.language's own @jit helpers (tl.zeros, tl.cumsum, ...) are compiled-mode functions
  # when triton was imported without TRITON_INTERPRET: give the kernels interpreted ones.
  for lang in (tl, tl.standard):
    for name, obj in list(vars(lang).items()):
      if isinstance(obj, triton.runtime.jit.JITFunction):
        monkeypatch.setattr(lang, name, ti.InterpretedFunction(obj.fn))

  def device_call(self, *args, **kwargs):
    # Triton 3.6 patches triton.language on every device-function call and never undoes it,
    # which breaks later compiled-mode use in this process: undo it on return.
    scope = ti._patch_lang(self.fn)
    try:
      return self.rewrite()(*args, **kwargs)
    except Exception as e:
      raise ti.InterpreterError(repr(e)) from e
    finally:
      scope.restore()

  monkeypatch.setattr(ti.InterpretedFunction, "__call__", device_call)
  return ti
