"""N-ordering AR (PAPER.md §8, the study's App. 12): next-token prediction in permuted orders.

N orders of the window's tokens 1..L are fixed before training (order 0 is left to right). A
training sequence picks one uniformly; the window is rearranged in that order, each input keeps
its original position (RoPE position ids follow the permutation) and its label is the next
token in the permuted order. Token 0 stays first: it has no predecessor in any order.
"""

import jax
import jax.numpy as jnp
import numpy as np

ORDER_KINDS = ("local", "random")


def order_problems(num_orders: int, kind: str) -> list[str]:
    """What is wrong with `ar.num_orders` and `ar.order_kind`, one message each (empty: none)."""
    problems = []
    if num_orders < 1:
        problems.append(f"ar.num_orders={num_orders}: must be >= 1 (1 = left to right)")
    if kind not in ORDER_KINDS:
        problems.append(f"ar.order_kind={kind!r}: allowed {', '.join(ORDER_KINDS)}")
    return problems


def make_orders(num_orders: int, length: int, kind: str, seed: int) -> np.ndarray:
    """N orders of `length` positions: [num_orders, length] int32 permutations of 0..length-1.

    Order 0 is the identity. kind "local" is the study's noisy local perturbation
    order_i = argsort(arange(L) + N(0, i^2)) (standard deviation i, so later orders wander
    further); "random" is a uniform random permutation. Seeded: the same arguments give the
    same orders on every host and every resume.
    """
    problems = order_problems(num_orders, kind)
    if problems:
        raise ValueError("; ".join(problems))
    rs = np.random.RandomState(seed)
    orders = [np.arange(length)]
    for i in range(1, num_orders):
        if kind == "local":
            orders.append(np.argsort(np.arange(length) + rs.normal(0.0, i, length), kind="stable"))
        else:
            orders.append(rs.permutation(length))
    return np.stack(orders).astype(np.int32)


def permute_windows(tokens: jax.Array, perms: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Windows rearranged in per-sequence orders, as next-token training data.

    tokens: [batch, L + 1] windows; perms: [batch, L] permutations of the positions 1..L
    (0-based: perms[b, j] = i means the j-th token after token 0 is tokens[b, 1 + i]).
    Returns (inputs, targets, input positions, target positions), each [batch, L]: the
    permuted window w = [tokens[:, 0], tokens[:, 1 + perms]] gives inputs w[:, :-1] and targets
    w[:, 1:]; the positions are the original ones of those tokens.
    """
    window = jnp.concatenate(
        [tokens[:, :1], jnp.take_along_axis(tokens[:, 1:], perms, axis=1)], axis=1)
    original = jnp.concatenate([jnp.zeros_like(perms[:, :1]), perms + 1], axis=1)
    return window[:, :-1], window[:, 1:], original[:, :-1], original[:, 1:]
