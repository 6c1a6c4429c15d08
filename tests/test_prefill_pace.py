"""benchmarks/suite/prefill_pace.py on SGLang's own log lines: the pace is the longest
prefill-only stretch's seconds over the prompts finished in it."""

from __future__ import annotations

import pytest
from script_loader import load_script

pace = load_script("benchmarks/suite/prefill_pace.py", "bench_suite_prefill_pace")


def prefill(ts: str, new: int, running: int) -> str:
    return (f"[2026-11-30 {ts}] Prefill batch, #new-seq: 1, #new-token: {new}, #cached-token: 0, token usage: 0.10, "
            f"#running-req: {running}, #queue-req: 5, #pending-token: 0, cuda graph: False, input throughput (token/s): 1.0")


def decode(ts: str, running: int) -> str:
    return (f"[2026-11-30 {ts}] Decode batch, #running-req: {running}, #token: 10, token usage: 0.10, cuda graph: True, "
            "gen throughput (token/s): 1.0, #queue-req: 0")


def test_the_longest_prefill_only_stretch_sets_the_pace():
    lines = [
        prefill("10:00:00", 6, 0),  # the server's warm-up request: not a prompt's chunk
        decode("10:00:01", 1),
        prefill("10:00:10", 8192, 0), prefill("10:00:12", 8192, 0), prefill("10:00:14", 8192, 1),
        prefill("10:00:16", 8192, 1), prefill("10:00:18", 8192, 2),
        decode("10:00:19", 2),
        prefill("10:01:00", 8192, 0), prefill("10:01:30", 8192, 1),  # one prompt, slower: a shorter stretch
    ]
    row = pace.prefill_pace(lines)
    assert row["prompts"] == 2 and row["seconds"] == 8.0 and row["seconds_per_prompt"] == 4.0
    assert row["first"] == "2026-11-30T10:00:10" and row["last"] == "2026-11-30T10:00:18"


def test_a_rank_tag_after_the_time_is_read():
    """With tensor parallelism SGLang tags its lines ``[time TP0]``."""
    lines = [prefill("10:00:10", 8192, 0).replace("10:00:10]", "10:00:10 TP0]"),
             prefill("10:00:16", 8192, 2).replace("10:00:16]", "10:00:16 TP0]")]
    assert pace.prefill_pace(lines)["seconds_per_prompt"] == 3.0


def test_a_log_where_no_prompt_finished_is_an_error():
    with pytest.raises(ValueError, match="no prompt of at least 1024 tokens"):
        pace.prefill_pace([prefill("10:00:00", 8192, 0), prefill("10:00:02", 8192, 0), decode("10:00:03", 0)])
