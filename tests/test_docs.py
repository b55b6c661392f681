"""The README and docs/ against the code: every fenced shell command is checked, the cheap ones run.

From each ```bash block of README.md and docs/*.md, every command (continuation lines joined,
comments dropped, split at && ; | ||) is checked: a `umerl` command (`umerl`, `.venv/bin/umerl`,
`python -m umerl.cli`, also after `ray job submit ... --`) names a subcommand that exists, each
--flag it passes is in that subcommand's --help, and each key=value override is a key of
umerl/config/defaults.yaml; `make TARGET` names a Makefile target (and `make run ARGS="..."`
is checked as the `umerl train` it runs); any other program is a system tool or installed in
the venv, and `hf` and `ray` commands pass only options their own --help lists; every path
into the repository's own folders (recipes/, bench/, scripts/, ...) exists. `umerl --help`,
every subcommand's --help and the documented `umerl plan`, `config show`, `recipes` and
`--version` commands without placeholders are run. README.md is at most 250 lines and links
every docs page; every relative link resolves.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from umerl import cli
from umerl.config.recipe import defaults

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
# A path into one of these folders must exist; runs/, data/, /models/... are the user's.
REPO_DIRS = {"recipes", "bench", "scripts", "umerl", "rollout", "rewards", "tests", "docs"}
SEPARATORS = {"&&", "||", "|", ";"}
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
KEY = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)=")
UMERL_PROGRAMS = {"umerl", ".venv/bin/umerl", ".venv-gpu/bin/umerl"}
OVERRIDE_SUBCOMMANDS = {"train", "rl", "plan", "serve", "check", "config"}


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]


@dataclass
class Problems:
    items: list[str] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every ```bash / ```sh / ```shell block."""
    blocks, lines, start, inside = [], [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence and not inside:
            inside, lines, start = True, [], number + 1
            shell = fence.group(1) in {"bash", "sh", "shell"}
        elif line.strip() == "```" and inside:
            inside = False
            if shell:
                blocks.append((start, lines))
        elif inside:
            lines.append(line)
    return blocks


def commands(text: str, name: str) -> list[Command]:
    """Every command of the markdown's shell blocks, as argv lists."""
    found = []
    for start, lines in shell_blocks(text):
        buffer, first = "", start
        for offset, line in enumerate(lines):
            if not buffer:
                first = start + offset
            if line.rstrip().endswith("\\"):
                buffer += line.rstrip()[:-1] + " "
                continue
            buffer += line + "\n"
            try:  # a quoted string may span lines (curl -d '{...}'): read on until it closes
                tokens = shlex.split(buffer, comments=True)
            except ValueError:
                continue
            found.extend(Command(f"{name}:{first}", argv) for argv in split_tokens(tokens))
            buffer = ""
    return found


def split_tokens(tokens: list[str]) -> list[list[str]]:
    """One token list per command; subshell parentheses dropped."""
    out, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(token.strip("()") if token not in {"(", ")"} else "")
    out.append(current)
    return [[t for t in argv if t] for argv in out if any(argv)]


def umerl_args(argv: list[str]) -> list[str] | None:
    """The arguments after the umerl program, or None when this is not a umerl command."""
    for i, token in enumerate(argv):
        if token in UMERL_PROGRAMS:
            return argv[i + 1:]
        if token == "umerl.cli" and i >= 1 and argv[i - 1] == "-m":
            return argv[i + 1:]
    return None


def program(argv: list[str]) -> tuple[str, list[str]]:
    """The program and its arguments, past leading VAR=value assignments and `timeout N`."""
    i = 0
    while i < len(argv) and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[i]):
        i += 1
    if i < len(argv) and argv[i] == "timeout":
        i += 2
    return (argv[i], argv[i + 1:]) if i < len(argv) else ("", [])


def help_text(args: list[str]) -> tuple[int, str]:
    """Run `umerl ARGS` in this process (cheap: --help only), its exit status and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            status = cli.main(args)
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
    return status, out.getvalue()


class CliSpec:
    """Subcommands and their --help flags, read from the real parser's --help output."""

    def __init__(self) -> None:
        self.tool_help: dict[tuple[str, ...], str | None] = {}  # hf, ray: their --help texts
        status, top = help_text(["--help"])
        assert status == 0, "umerl --help failed"
        names = re.search(r"\{([a-z,-]+)\}", top)
        assert names, top
        self.flags: dict[str, set[str]] = {}
        for name in names.group(1).split(","):
            self.flags[name] = self._flags([name])
        status, route = help_text(["route", "--help"])
        for nested in re.findall(r"\{([a-z,-]+)\}", route)[:1]:
            for name in nested.split(","):
                self.flags[f"route {name}"] = self._flags(["route", name])

    @staticmethod
    def _flags(path: list[str]) -> set[str]:
        status, text = help_text([*path, "--help"])
        assert status == 0, f"umerl {' '.join(path)} --help exited {status}"
        return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", text))


def defaults_has(key: str, base) -> bool:
    node = base
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node[part]
    return True


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9_-]*)\s*:(?!=)", text, re.M))
    for phony in re.findall(r"^\.PHONY:(.*)$", text, re.M):
        targets.update(phony.split())
    return targets


def check_command(cmd: Command, spec: CliSpec, base, targets: set[str],
                  problems: Problems) -> None:
    prog, args = program(cmd.argv)
    if prog == "make":
        check_make(cmd, args, spec, base, targets, problems)
    check_program(cmd.where, prog, args, spec.tool_help, problems)
    rest = umerl_args(cmd.argv)
    if rest is not None:
        check_umerl(cmd.where, rest, spec, base, problems)
    script = next((a for a in cmd.argv if re.match(r"^(bench|scripts)/\w+\.py$", a)), None)
    if script and (REPO / script).exists():
        check_script_flags(cmd.where, script, cmd.argv[cmd.argv.index(script) + 1:], problems)
    check_paths(cmd.where, cmd.argv, problems)


# Programs a command may run besides those installed in the venv (umerl, python, pip, ray,
# hf, ...): a documented program is one of these or in the venv's bin folder, so a command the
# venv does not have (`huggingface-cli`, gone from huggingface_hub) is caught.
SYSTEM_PROGRAMS = {"bash", "cat", "cd", "curl", "flock", "make", "mkdir", "mv", "pip", "python",
                   "rmdir", "tar"}
# The venv's own tools whose documented --flags are checked against their --help.
HELP_CHECKED = {"hf", "ray"}
VENV_BIN = Path(sys.executable).parent
SUBCOMMAND = re.compile(r"^[a-z][a-z-]*$")


def check_program(where: str, prog: str, args: list[str], helps: dict[tuple[str, ...], str],
                  problems: Problems) -> None:
    """``prog`` exists; for ``hf`` and ``ray``, each --flag is in its subcommand's --help."""
    name = Path(prog).name
    if not name or name in SYSTEM_PROGRAMS:
        return
    if not (VENV_BIN / name).exists():
        problems.add(where, f"{prog} is not installed in the venv ({VENV_BIN})")
        return
    if name not in HELP_CHECKED:
        return
    own = args[:args.index("--")] if "--" in args else args  # after --: the job's command
    path = [name]
    for token in own[:2]:
        if not SUBCOMMAND.match(token):
            break
        path.append(token)
    text = tool_help(tuple(path), helps)
    if text is None:
        problems.add(where, f"`{' '.join(path)} --help` failed")
        return
    for token in own:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
            problems.add(where, f"{' '.join(path)} has no option {flag} (not in its --help)")


def tool_help(path: tuple[str, ...], helps: dict[tuple[str, ...], str | None]) -> str | None:
    """The --help text of ``path`` (a venv program and its subcommands), once per path; None
    when there is no such command."""
    if path not in helps:
        helps[path] = ray_help(path[1:]) if path[0] == "ray" else process_help(path)
    return helps[path]


def process_help(path: tuple[str, ...]) -> str | None:
    run = subprocess.run([str(VENV_BIN / path[0]), *path[1:], "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    return run.stdout if run.returncode == 0 else None


def ray_help(sub: tuple[str, ...]) -> str | None:
    """What `ray SUB --help` prints, from Ray's click command in this process (a `ray` process
    per subcommand costs seconds of import each)."""
    import warnings

    import click

    with warnings.catch_warnings():  # Ray Serve's pydantic models warn on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.scripts.scripts import cli

    command: click.Command | None = cli
    ctx = click.Context(cli, info_name="ray")
    for name in sub:
        command = command.get_command(ctx, name) if isinstance(command, click.Group) else None
        if command is None:
            return None
        ctx = click.Context(command, info_name=name, parent=ctx)
    return command.get_help(ctx)


def check_script_flags(where: str, script: str, args: list[str], problems: Problems) -> None:
    """A bench or script's --flags against the options its argparse declares (its source)."""
    declared = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", (REPO / script).read_text()))
    for token in args:
        flag = token.lstrip("[").split("=", 1)[0]
        if flag.startswith("--") and flag not in declared | {"--help"}:
            problems.add(where, f"{script} has no option {flag}")


def check_make(cmd: Command, args: list[str], spec: CliSpec, base, targets: set[str],
               problems: Problems) -> None:
    wanted = [a for a in args if "=" not in a and not a.startswith("-")]
    for target in wanted:
        if target not in targets:
            problems.add(cmd.where, f"make target {target!r} is not in the Makefile")
    extra = [a.split("=", 1)[1] for a in args if a.startswith("ARGS=")]
    if "run" in wanted and extra:  # make run = umerl train recipes/cpu_tiny.yaml $(ARGS)
        check_umerl(cmd.where, ["train", "recipes/cpu_tiny.yaml", *shlex.split(extra[0])],
                    spec, base, problems)


def check_umerl(where: str, args: list[str], spec: CliSpec, base, problems: Problems) -> None:
    if not args or args[0].startswith("-"):
        bad = [a for a in args if a.startswith("--") and a != "--help"]
        for flag in bad:
            problems.add(where, f"umerl takes no option {flag}")
        return
    sub = args[0]
    if sub == "route" and len(args) > 1:
        sub, args = f"route {args[1]}", args[1:]
    if sub not in spec.flags:
        problems.add(where, f"umerl has no subcommand {sub!r}")
        return
    for raw in args[1:]:
        token = raw.lstrip("[").rstrip("]")
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            if flag not in spec.flags[sub]:
                problems.add(where, f"umerl {sub} has no option {flag} (not in its --help)")
            continue
        key = KEY.match(token)
        if key and key.group(1) != "key":  # `key=value` is the usage line's placeholder
            if sub.split()[0] not in OVERRIDE_SUBCOMMANDS:
                problems.add(where, f"umerl {sub} takes no key=value override ({token})")
            elif not defaults_has(key.group(1), base):
                problems.add(where, f"{key.group(1)!r} is not a key of "
                             "umerl/config/defaults.yaml")


def check_paths(where: str, argv: list[str], problems: Problems) -> None:
    for token in argv:
        token = token.lstrip("[").rstrip("]")
        if "=" in token or token.startswith(("-", "/")) or "/" not in token:
            continue
        if token.split("/", 1)[0] in REPO_DIRS and not (REPO / token).exists():
            problems.add(where, f"{token} does not exist in the repository")


def check_docs(files: dict[str, str], spec: CliSpec) -> Problems:
    """Every command of the given markdown files (name -> text) against the CLI and repo."""
    problems, base, targets = Problems(), defaults(), makefile_targets()
    for name, text in files.items():
        for cmd in commands(text, name):
            check_command(cmd, spec, base, targets, problems)
    return problems


def doc_files() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in DOCS}


@pytest.fixture(scope="module")
def spec() -> CliSpec:
    return CliSpec()


def test_every_documented_command_matches_the_cli(spec: CliSpec) -> None:
    files = doc_files()
    found = [c for name, text in files.items() for c in commands(text, name)]
    assert sum(umerl_args(c.argv) is not None for c in found) >= 30, "commands not extracted"
    problems = check_docs(files, spec)
    assert not problems.items, "\n".join(problems.items)


def test_a_broken_command_is_caught(spec: CliSpec) -> None:
    broken = """
```bash
.venv/bin/umerl eval CHECKPOINT umerl-mini --no-such-flag 3
umerl train recipes/cpu_tiny.yaml rl.no_such_key=1 \\
    --address HEAD
make no-such-target && make run ARGS="sft.maxsteps=100"
python -m umerl.cli frobnicate recipes/no_such_recipe.yaml
ray job submit --working-dir . -- python -m umerl.cli rl recipes/cpu_tiny.yaml --checkpoint X
.venv/bin/python bench/bench_async.py --stepz 3
huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir /models/q
hf download TIGER-Lab/MMEB-V2 --repo-type dataset --local-dirr DIR
ray job submit --address http://HEAD:8265 --no-wait -- python -m umerl.cli train --nope
ray job sumbit --address http://HEAD:8265
```
"""
    problems = "\n".join(check_docs({"broken.md": broken}, spec).items)
    for expected in ("broken.md:3: umerl eval has no option --no-such-flag",
                     "broken.md:4: 'rl.no_such_key' is not a key",
                     "broken.md:6: make target 'no-such-target'",
                     "broken.md:6: 'sft.maxsteps' is not a key",
                     "broken.md:7: umerl has no subcommand 'frobnicate'",
                     "broken.md:7: recipes/no_such_recipe.yaml does not exist"):
        assert expected in problems, problems
    assert "bench/bench_async.py has no option --stepz" in problems
    assert "broken.md:10: huggingface-cli is not installed in the venv" in problems
    assert "broken.md:11: hf download has no option --local-dirr" in problems
    assert "--repo-type" not in problems and "--no-wait" not in problems
    assert "broken.md:12: umerl train has no option --nope" in problems
    assert "broken.md:13: `ray job sumbit --help` failed" in problems
    assert "broken.md:8" not in problems  # a correct submitted command passes


# Documented commands cheap enough to run as they are written: no Ray, no weights, no data.
CHEAP = {"plan", "config", "recipes", "--version"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$|\.\.\.")  # RECIPE, CHECKPOINT, sft.data=[...]


def documented_cheap_commands() -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for name, text in doc_files().items():
        for cmd in commands(text, name):
            rest = umerl_args(cmd.argv)
            if rest and rest[0] in CHEAP and not any(PLACEHOLDER.search(t) for t in rest):
                found.add(tuple(rest))
    return found


def test_documented_cheap_commands_run() -> None:
    """`umerl plan` (per-GPU memory: each documented one fits), `config show`, `recipes` and
    `--version` need no Ray, weights or data: each documented one runs and exits 0."""
    found = documented_cheap_commands()
    for wanted in ("plan", "config"):
        assert any(rest[0] == wanted for rest in found), f"no documented umerl {wanted} command"
    for rest in sorted(found):
        run = subprocess.run([sys.executable, "-m", "umerl.cli", *rest], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"umerl {' '.join(rest)}:\n{run.stdout}\n{run.stderr}"
        assert run.stdout.strip(), f"umerl {' '.join(rest)} printed nothing"


# Inline code that looks like a recipe key but names something else: Ray's `ray.put` and
# `ray.util.metrics`, Ray Serve's `@serve.batch` decorator, the typo troubleshooting.md quotes.
NOT_KEYS = {"ray.put", "ray.util.metrics", "serve.batch", "rl.lrr"}


def test_every_recipe_key_named_in_the_prose_exists() -> None:
    """`section.key` in inline code, where section is a defaults.yaml section, is a real key
    (a renamed or removed key leaves no stale name in the docs)."""
    base = defaults()
    sections = {k for k in base if OmegaConf.is_dict(base[k])}
    problems = []
    for page in DOCS:
        for code in re.findall(r"`([^`\n]+)`", page.read_text()):
            for match in re.finditer(r"(?<![\w/.-])([a-z_]+(?:\.[a-z0-9_]+)+)", code):
                key = match.group(1)
                if (key.split(".")[0] in sections and key not in NOT_KEYS
                        and "._" not in key  # a private name of a module: code, not a key
                        and not re.search(r"\.(png|py|yaml|jsonl?|md)$", key)
                        and not defaults_has(key, base)):
                    problems.append(f"{page.relative_to(REPO)}: `{code}` names no key {key}")
    assert not problems, "\n".join(problems)


README_MAX_LINES = 250  # issue 29: a README that fits on a few screens; the rest is in docs/


def test_the_readme_fits_on_a_few_screens() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_every_page_is_linked_and_every_link_resolves() -> None:
    """Every docs/ page, its index too, is linked from the top README itself (issue 29's
    acceptance), and every relative link of every page resolves."""
    linked, problems = set(), []
    for page in DOCS:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # http(s):, mailto:, an anchor on the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
            if page == REPO / "README.md":
                linked.add(rel)
            if not path.exists():
                problems.append(f"{page.relative_to(REPO)}: link {target} does not resolve")
    for page in (REPO / "docs").glob("*.md"):
        rel = str(page.relative_to(REPO))
        if rel not in linked:
            problems.append(f"{rel} is not linked from README.md")
    assert not problems, "\n".join(problems)
