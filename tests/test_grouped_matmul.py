"""grouped_matmul (xla implementation) against a dense per-group numpy loop, and swiglu."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep.layout import DispatchLayout


def random_layout(rng, e_local, capacity, alignment, sizes=None):
  """A layout with random group sizes (zeros and a giant group included) packed like dispatch."""
  if sizes is None:
    sizes = rng.integers(0, 6, size=e_local)
    sizes[rng.integers(e_local)] = 0
    if rng.random() < 0.5:
      sizes[rng.integers(e_local)] = capacity  # overflows: clipped below
  offsets, kept, off = [], [], 0
  for s in sizes:
    offsets.append(min(off, capacity))
    kept.append(int(np.clip(capacity - off, 0, s)))
    off = -(-(off + int(s)) // alignment) * alignment
  i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))
  return DispatchLayout(
      group_sizes=i32(kept), group_offsets=i32(offsets), num_recv_rows=i32(sum(kept)),
      num_dropped=i32(0), num_invalid=i32(0), topk_idx=i32(np.zeros((1, 1))),
      recv_pos=i32(np.zeros((1, 1, 1))), row_weights=jnp.zeros((capacity,), jnp.float32))


def reference_gmm(x, w, layout):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[2]))
  for e, (o, s) in enumerate(zip(np.asarray(layout.group_offsets), np.asarray(layout.group_sizes))):
    out[o:o + s] = x[o:o + s] @ w[e]
  return out


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("alignment", [1, 4])
def test_grouped_matmul_matches_loop(rng, dtype, tol, alignment):
  e_local, capacity, h, n = 5, 24, 8, 7
  layout = random_layout(rng, e_local, capacity, alignment)
  x = jnp.asarray(rng.standard_normal((capacity, h)), dtype)  # rows outside groups are not zero
  w = jnp.asarray(rng.standard_normal((e_local, h, n)), dtype)
  y = jax.jit(jax_ep.grouped_matmul)(x, w, layout)
  assert y.shape == (capacity, n) and y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float64), reference_gmm(x, w, layout), rtol=tol,
                             atol=tol * np.sqrt(h))


def test_grouped_matmul_gradients_match_loop(rng):
  e_local, capacity, h, n = 4, 20, 6, 5
  layout = random_layout(rng, e_local, capacity, 2)
  x = jnp.asarray(rng.standard_normal((capacity, h)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((e_local, h, n)), jnp.float32)
  dy = rng.standard_normal((capacity, n))
  dx, dw = jax.grad(lambda x, w: jnp.sum(jax_ep.grouped_matmul(x, w, layout) * dy),
                    argnums=(0, 1))(x, w)
  exp_dx = np.zeros((capacity, h))
  exp_dw = np.zeros((e_local, h, n))
  for e, (o, s) in enumerate(zip(np.asarray(layout.group_offsets), np.asarray(layout.group_sizes))):
    exp_dx[o:o + s] = dy[o:o + s] @ np.asarray(w[e]).T
    exp_dw[e] = np.asarray(x[o:o + s]).T @ dy[o:o + s]
  np.testing.assert_allclose(dx, exp_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, exp_dw, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_loop(rng):
  e_local, capacity, h, f = 3, 16, 8, 12
  layout = random_layout(rng, e_local, capacity, 1)
  x = rng.standard_normal((capacity, h)).astype(np.float32)
  wg = rng.standard_normal((e_local, h, f)).astype(np.float32) / 3
  wu = rng.standard_normal((e_local, h, f)).astype(np.float32) / 3
  wd = rng.standard_normal((e_local, f, h)).astype(np.float32) / 3
  y = jax_ep.experts.swiglu(x, wg, wu, wd, layout)
  exp = np.zeros((capacity, h))
  for e, (o, s) in enumerate(zip(np.asarray(layout.group_offsets), np.asarray(layout.group_sizes))):
    g, u = x[o:o + s] @ wg[e], x[o:o + s] @ wu[e]
    exp[o:o + s] = (g / (1 + np.exp(-g)) * u) @ wd[e]
  np.testing.assert_allclose(y, exp, rtol=1e-4, atol=1e-4)


def test_swiglu_fused_matches_swiglu(rng):
  """swiglu_fused on [w_gate | w_up] gives swiglu's values and, split back, its gradients
  (random layout with empty groups and rows outside groups)."""
  e_local, capacity, h, f = 4, 40, 8, 6
  layout = random_layout(rng, e_local, capacity, 4)
  x = jnp.asarray(rng.standard_normal((capacity, h)), jnp.float32)
  wg, wu = (jnp.asarray(rng.standard_normal((e_local, h, f)) / 3, jnp.float32) for _ in "gu")
  wd = jnp.asarray(rng.standard_normal((e_local, f, h)) / 3, jnp.float32)
  probe = jnp.asarray(rng.standard_normal((capacity, h)), jnp.float32)

  def loss_split(x, wg, wu, wd):
    return jnp.sum(jax_ep.experts.swiglu(x, wg, wu, wd, layout) * probe)

  def loss_fused(x, wgu, wd):
    return jnp.sum(jax_ep.experts.swiglu_fused(x, wgu, wd, layout) * probe)

  wgu = jnp.concatenate([wg, wu], axis=-1)
  np.testing.assert_allclose(jax_ep.experts.swiglu_fused(x, wgu, wd, layout),
                             jax_ep.experts.swiglu(x, wg, wu, wd, layout), rtol=1e-6, atol=1e-6)
  dx, dwg, dwu, dwd = jax.grad(loss_split, argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  fx, fwgu, fwd = jax.grad(loss_fused, argnums=(0, 1, 2))(x, wgu, wd)
  for got, want in ((fx, dx), (fwgu[..., :f], dwg), (fwgu[..., f:], dwu), (fwd, dwd)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(dwg)).max() > 0  # the gradients are not trivially zero


def test_swiglu_bad_shapes():
  layout = random_layout(np.random.default_rng(0), 3, 8, 1)
  x = jnp.zeros((8, 4))
  with pytest.raises(ValueError, match="w_gate_up must be"):
    jax_ep.experts.swiglu_fused(x, jnp.zeros((3, 4, 5)), jnp.zeros((3, 2, 4)), layout)
  with pytest.raises(ValueError, match=r"w_down must be \[E_local, ffn, hidden\] = \(3, 3, 4\)"):
    jax_ep.experts.swiglu_fused(x, jnp.zeros((3, 4, 6)), jnp.zeros((3, 4, 3)), layout)
  with pytest.raises(ValueError, match="must equal"):
    jax_ep.experts.swiglu(x, jnp.zeros((3, 4, 5)), jnp.zeros((3, 4, 6)), jnp.zeros((3, 5, 4)),
                          layout)
  # The layout's expert count and recv_x's width, checked as grouped_matmul checks w, under
  # swiglu_fused's own names.
  with pytest.raises(ValueError, match=r"experts.swiglu_fused: w_gate_up must be "
                                       r"\[num_local_experts=3, hidden=4, N\]"):
    jax_ep.experts.swiglu_fused(x, jnp.zeros((2, 4, 6)), jnp.zeros((2, 3, 4)), layout)
  with pytest.raises(ValueError, match="swiglu_fused: backend='cuda' must be"):
    jax_ep.experts.swiglu_fused(x, jnp.zeros((3, 4, 6)), jnp.zeros((3, 3, 4)), layout,
                                backend="cuda")


def test_grouped_matmul_bad_shapes(rng):
  layout = random_layout(rng, 3, 8, 1)
  x = jnp.zeros((8, 4))
  with pytest.raises(ValueError, match="w must be"):
    jax_ep.grouped_matmul(x, jnp.zeros((2, 4, 5)), layout)
  with pytest.raises(ValueError, match="recv_x must be"):
    jax_ep.grouped_matmul(jnp.zeros((7, 4)), jnp.zeros((3, 4, 5)), layout)
  with pytest.raises(ValueError, match="backend"):
    jax_ep.grouped_matmul(x, jnp.zeros((3, 4, 5)), layout, backend="cuda")
