"""The pages say what the code prints. The seconds-long snippets of docs/exercises.md, read from the page
itself, are run and their output compared with the page's answers; the README's expected quickstart
output is checked against the criterion (eq. 6) and the schedule of the command it shows."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXERCISES = (ROOT / "docs" / "exercises.md").read_text()
README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"-?\d+\.?\d*(?:e-?\d+)?")


def sections(page):
    """{exercise number: its text} of the page's "## N. title" sections."""
    parts = re.split(r"^## (\d+)\. ", page, flags=re.M)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


def snippet(text):
    """The Python program of a section's `python - <<'EOF'` block."""
    programs = re.findall(r"python - <<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)
    assert len(programs) == 1
    return programs[0]


def answer_blocks(text, language=""):
    """The code blocks of the section's folded answer in the given language ("" for output)."""
    answer = text.split("<summary>Answer (measured)</summary>", 1)[1]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", answer, flags=re.S | re.M)  # fences paired in order
    return [body for block_language, body in blocks if block_language == language]


# Runs each program of a JSON list as `python -` would (a fresh __main__ namespace, from the repository
# root), in one interpreter to pay for importing torch once; prints a JSON list of (stdout, error).
RUNNER = """
import contextlib, io, json, sys, traceback
results = []
for program in json.load(sys.stdin):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(program, "<stdin>", "exec"), {"__name__": "__main__"})
        results.append((out.getvalue(), None))
    except Exception:
        results.append((out.getvalue(), traceback.format_exc()))
print(json.dumps(results))
"""


def run_programs(programs):
    """[(stdout, traceback or None)] of each program."""
    out = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(programs), cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_same_output(printed, expected):
    """The same text with the same numbers, each to the precision the page prints it with (full-precision
    floats to a relative 1e-6, which leaves room for another machine's rounding)."""
    printed_lines, expected_lines = printed.strip().splitlines(), expected.strip().splitlines()
    assert len(printed_lines) == len(expected_lines), printed
    for have, want in zip(printed_lines, expected_lines):
        assert NUMBER.sub("#", have) == NUMBER.sub("#", want), (have, want)
        for a, b in zip(NUMBER.findall(have), NUMBER.findall(want)):
            decimals = len(b.split(".")[1]) if "." in b and "e" not in b else 0
            tolerance = max(1e-6 * abs(float(b)), 0.5 * 10 ** -decimals if decimals < 10 else 0)
            assert float(a) == pytest.approx(float(b), abs=tolerance), (have, want)


def exercise_7():
    text = sections(EXERCISES)[7]
    program = snippet(text)
    # with the page's solution in place of the stub, the page's output
    (solution,) = answer_blocks(text, "python")
    stub = re.search(r"def my_variance\(x\):\n    raise NotImplementedError\(.*\)\n", program).group(0)
    (expected,) = answer_blocks(text)
    return [(program.replace(stub, solution), expected)]


def exercise_8():
    text = sections(EXERCISES)[8]
    (expected,) = answer_blocks(text)
    return [(snippet(text), expected)]


def exercise_9():
    """Run as written, then with the other direction dropped, as the page says: both print the same
    first block."""
    text = sections(EXERCISES)[9]
    program = snippet(text)
    (expected,) = answer_blocks(text)
    lines = expected.splitlines()
    other = program.replace("query_dropped = 0", "query_dropped = 1").replace('"without 0->1"', '"without 1->0"')
    assert other.count("query_dropped = 1") == 1 and '"without 1->0"' in other
    return [(program, "\n".join(lines[:4])), (other, "\n".join(lines[:2] + lines[4:6]))]


def exercise_10():
    text = sections(EXERCISES)[10]
    (expected,) = answer_blocks(text)
    return [(snippet(text), expected)]


SNIPPETS = {7: exercise_7, 8: exercise_8, 9: exercise_9, 10: exercise_10}


def test_every_snippet_of_the_exercises_is_run_here():
    with_snippets = {number for number, text in sections(EXERCISES).items() if "python - <<'EOF'" in text}
    assert with_snippets == set(SNIPPETS)


def test_exercise_snippets_print_the_pages_answers():
    cases = [(number, program, expected) for number in sorted(SNIPPETS) for program, expected in SNIPPETS[number]()]
    as_written_7 = snippet(sections(EXERCISES)[7])
    results = run_programs([program for _, program, _ in cases] + [as_written_7])
    for (number, _, expected), (printed, error) in zip(cases, results):
        assert error is None, (number, error)
        assert_same_output(printed, expected)
    # exercise 7 as written: its placeholder says what to write instead, before anything is printed
    printed, error = results[-1]
    assert printed == "" and "NotImplementedError: replace this line with yours: return v(x)" in error


def test_readme_quickstart_output_is_the_criterion_and_the_schedule_of_its_command():
    """Each progress line of the README's expected output: `loss` = α·(inv + var + cov) + (1 − α)·(local
    terms) up to the printed rounding, the step count and the learning rate of the README's command."""
    command = re.search(r"^python train\.py (--dataset toy .*)$", README, flags=re.M).group(1)
    args = train.get_arguments(shlex.split(command))
    lines = re.findall(r"^\[\d+/\d+\] eta .*$", README, flags=re.M)
    assert len(lines) >= 3
    steps_per_epoch = args.toy_images // args.batch_size
    total = args.epochs * steps_per_epoch
    peak_lr = args.base_lr * args.batch_size / 256
    for line in lines:
        step, steps = map(int, re.match(r"\[(\d+)/(\d+)\]", line).groups())
        values = dict(re.findall(r"(\w+) (-?[\d.]+(?:e-?\d+)?)", line))
        assert steps == total
        global_terms = sum(float(values[name]) for name in ("inv", "var", "cov"))
        local_terms = sum(float(values[name]) for name in ("local_inv", "local_var", "local_cov"))
        criterion = args.alpha * global_terms + (1 - args.alpha) * local_terms
        assert float(values["loss"]) == pytest.approx(criterion, abs=0.5e-3 * 3 + 0.5e-4)  # terms to 3 decimals
        assert "cls_loss" in values
        # the lr of the interval's last step, as the progress line prints it
        lr = train.learning_rate(step - 1, total, args.warmup_epochs * steps_per_epoch, peak_lr, args.end_lr_ratio)
        assert values["lr"] == f"{lr:.3g}"
