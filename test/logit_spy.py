"""Comparing two answers whose arithmetic differs (an 8-bit arena against full-precision buffers):
the logits of every step, read by a spy around the engine's real language-model head, and the
tokens only as far as the logits can decide them. Random tiny models put their top two logits
within 1e-4 of each other at many steps, so exact token equality there would hang on the CPU's
rounding (CI's machine rounds otherwise than this one: 2026-12-07)."""


def spy_on_logits(engine) -> list:
    """Every row of logits the engine's language-model head computes, in order (the real head runs)."""
    rows, head = [], engine.model.logits

    def logits(hidden):
        out = head(hidden)
        rows.append(out[0].float().clone())
        return out
    engine.model.logits = logits
    return rows


def same_answer_up_to_a_near_tie(a, b, logits_a: list, logits_b: list, error: float):
    """b's tokens are a's while every step's logits agree within `error`; they may part only where a's
    own top two were within 2 * error. Returns how many tokens were compared."""
    for step, (x, y) in enumerate(zip(logits_a, logits_b)):
        assert float((x - y).abs().max()) <= error, step
        if a.token_ids[step] != b.token_ids[step]:
            assert float(x[a.token_ids[step]] - x[b.token_ids[step]]) <= 2 * error, step
            return step                       # after this the two answers read different tokens
    assert a.token_ids == b.token_ids
    return len(a.token_ids)
