"""``parity.py compare`` finds the margin where two runs part, for SGLang runs too.

The GPU parity test asks that ``lossless`` on the kernels parts from ``none`` (both
SGLang runs) only at near-ties. Until SGLang runs kept their top log-probs a step, the
margin was ``None`` for them and that test could not have passed.
"""

from __future__ import annotations

from script_loader import load_script

parity = load_script("benchmarks/parity/parity.py")


def _run(output_ids: list[int], step_top: list[dict[int, float]] | None) -> dict:
    run = {"ids": [1, 2, 3], "prompt_logprobs": [None, -0.5, -1.0], "output_ids": output_ids, "text": ""}
    if step_top is not None:
        run["step_top"] = step_top
    return run


def test_step_tops_read_sglang_s_top_logprobs_as_token_to_logprob():
    meta = [[(-0.1, 7, "a"), (-2.5, 9, "b")], [(-0.3, 4, None), (-0.9, 7, None)]]
    assert parity.step_tops(meta) == [{7: -0.1, 9: -2.5}, {4: -0.3, 7: -0.9}]


def test_compare_gives_the_first_run_s_margin_where_the_runs_part():
    a = _run([7, 4, 5], parity.step_tops([[(-0.1, 7, "")], [(-0.3, 4, ""), (-0.4, 8, "")], [(-0.2, 5, "")]]))
    b = _run([7, 8, 5], None)
    res = parity.compare({"engine": "sglang none", "runs": [a]}, {"engine": "sglang lossless", "runs": [b]}, None)
    (p,) = res["prompts"]
    assert not p["greedy_equal"] and p["first_divergence"] == 1
    assert abs(p["a_logprob_gap_at_divergence"] - 0.1) < 1e-9  # -0.3 against -0.4
    assert res["greedy_equal"] == 0


def test_a_token_off_the_first_run_s_top_list_is_bounded_by_its_lowest():
    a = _run([7], [{7: -0.1, 9: -2.5}])
    b = _run([3], None)
    (p,) = parity.compare({"engine": "a", "runs": [a]}, {"engine": "b", "runs": [b]}, None)["prompts"]
    assert abs(p["a_logprob_gap_at_divergence"] - 2.4) < 1e-9
