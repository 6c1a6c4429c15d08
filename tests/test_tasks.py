"""The RULER-style task generator: deterministic, answerable, scored right, lengths on target."""

import pytest

from mosaickv.tasks import KINDS, TOLERANCE, generate, hf_counter, score, suite

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def count():
    from transformers import AutoTokenizer

    from mosaickv import model as models

    return hf_counter(AutoTokenizer.from_pretrained(models.converted_model_dir()))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_task_and_answers_are_in_the_context(kind, count):
    a, b = generate(kind, 1024, count, seed=7), generate(kind, 1024, count, seed=7)
    assert a == b and a.kind == kind
    assert a != generate(kind, 1024, count, seed=8)
    assert a.answers and all(ans in a.context for ans in a.answers)
    assert not any(ans in a.question for ans in a.answers)  # the question never gives the answer away
    assert a.score(" ".join(a.answers)) == 1.0
    assert a.messages() == [{"role": "user", "content": a.context + "\n\n" + a.question}]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [1024, 2048, 4096, 7168])
def test_lengths_hit_the_target(kind, tokens, count):
    task = generate(kind, tokens, count, seed=1)
    assert abs(count(task.prompt) - tokens) <= TOLERANCE * tokens + 1


def test_scoring_normalizes_and_gives_partial_credit():
    assert score("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert score("It is 12345678", ["1234567"]) == 0.0  # whole words only
    assert score("**Cobalt**", ["cobalt"]) == 1.0
    assert score("uuid: 2CDCA67F-99a0-44ec-9585-d78f9019f54d!", ["2cdca67f-99a0-44ec-9585-d78f9019f54d"]) == 1.0
    assert score("1111111, 3333333 and 9999999", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert score("", ["x"]) == 0.0


def test_multikey_has_distractors_and_distinct_values(count):
    task = generate("multikey", 1024, count, seed=3)
    assert task.context.count("special magic numbers for") == 4
    assert task.meta["key"] in task.question
    multi = generate("multivalue", 1024, count, seed=3)
    assert len(set(multi.answers)) == 4 and multi.context.count(f"for {multi.meta['key']} is:") == 4


def test_freqwords_top_words_lead_clearly(count):
    task = generate("freqwords", 1024, count, seed=2)
    words = task.context.split("\n\n", 1)[1].split()
    counts = sorted((words.count(w) for w in set(words)), reverse=True)
    assert [words.count(a) for a in task.answers] == counts[:3] and counts[2] > counts[3]


def test_suite_sweeps_depth_round_robin(count):
    tasks = suite({"single_number": 3, "multikey": 1}, [1024], count, seed=0)
    assert [t.kind for t in tasks] == ["single_number", "multikey", "single_number", "single_number"]
    depths = [t.meta["depth"] for t in tasks if t.kind == "single_number"]
    assert depths == sorted(depths) and depths[0] < 0.3 and depths[-1] > 0.7
    with pytest.raises(ValueError, match="not one of"):
        generate("nope", 1024, count)


def test_the_haystack_does_not_depend_on_what_the_process_imported():
    """The filler was read from live docstrings until the fifteenth run, so a module's
    members (which grow as its submodules load) and the Python version changed the tasks a
    seed gave. It is read from the shipped corpus now: a process that imported other
    modules first gets the same sentences."""
    import hashlib
    import subprocess
    import sys

    from mosaickv.tasks import filler_sentences

    code = ("import email.mime.text, asyncio.subprocess, logging.handlers, unittest.mock, http.server, hashlib; "
            "from mosaickv.tasks import filler_sentences; "
            "print(hashlib.sha256('\\n'.join(filler_sentences()).encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256("\n".join(filler_sentences()).encode()).hexdigest()
    assert len(filler_sentences()) > 500


@pytest.mark.parametrize("kind", ["single_number", "single_word", "single_uuid", "multikey", "multivalue"])
def test_a_needle_answer_in_a_full_sentence_fits_the_budget(kind, count):
    """The answer as a wordy model gives it (the question's words back, then the values)
    fits the task's new tokens, so a right answer is never cut inside a value."""
    for seed in range(20):
        task = generate(kind, 1024, count, seed=seed)
        key = task.meta["key"]
        noun = {"single_number": "number", "single_word": "word", "single_uuid": "UUID", "multikey": "number",
                "multivalue": "numbers"}[kind]
        sentence = f"The special magic {noun} for {key} mentioned in the provided text is: {', '.join(task.answers)}."
        assert count(sentence) <= task.max_new_tokens, (kind, seed, count(sentence), task.max_new_tokens)
