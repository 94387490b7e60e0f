"""`chipwise report`: one self-contained HTML page (inline CSS, no scripts, nothing fetched) and its PNGs."""

from __future__ import annotations

import datetime
import html
import os
import secrets
import shutil
from pathlib import Path

from chipwise import __version__
from chipwise.catalog.power import format_range
from chipwise.errors import ChipwiseError
from chipwise.report import charts
from chipwise.report.runs import Run, load_runs

PAGE = "index.html"
CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.note { color: #666; font-style: italic; }
"""


def _fmt(value, spec: str = ",.4g", unit: str = "") -> str:
    if value is None:
        return "unknown"
    return f"{format(value, spec)}{unit}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_rows(runs: list[Run]) -> list[list[str]]:
    def row(label, fn):
        return [label] + [fn(r.summary, r.info) for r in runs]

    return [
        row("devices", lambda s, i: i.get("devices", "unknown")),
        row("parameters", lambda s, i: _fmt(i.get("params"), ",")),
        row("tokens (the whole run)", lambda s, i: _fmt(s.get("tokens"), ",")),
        row("wall time", lambda s, i: _fmt(s.get("wall_time_s"), ".1f", " s")),
        row("final train loss", lambda s, i: _fmt(s.get("final_train_loss"), ".4f")),
        row("validation loss", lambda s, i: f"{_fmt(s.get('first_val_loss'), '.4f')} -> "
                                            f"{_fmt(s.get('final_val_loss'), '.4f')}"),
        row("tokens/s", lambda s, i: _fmt(s.get("tokens_per_s"), ",.0f")),
        row("MFU", lambda s, i: _fmt(s.get("mfu") and s["mfu"] * 100, ".1f", "%")),
        row("MFU basis", lambda s, i: s.get("mfu_basis", "unknown")),
        row("USD per million tokens", lambda s, i: _fmt(s.get("usd_per_million_tokens"), ".4g")),
        row("kWh per million tokens", lambda s, i: _fmt(s.get("kwh_per_million_tokens"), ".4g")
            if s.get("kwh_per_million_tokens") is not None or not s.get("kwh_per_million_tokens_range")
            else format_range(*s["kwh_per_million_tokens_range"], ".4g")),
        row("compile time", lambda s, i: _fmt(i.get("compile_time_s"), ".1f", " s")),
        ["data"] + [r.info.get("data", "unknown") for r in runs],
        ["data mixture, realised"] + [_realised_mixture(r) for r in runs],
        # The divergence guard's events over every invocation: why a loss curve has a gap or steps back.
        ["skipped updates, rollbacks"] + [f"{len(r.events('skipped_update'))}, {len(r.events('rollback'))}"
                                          for r in runs],
    ]


def _realised_mixture(run: Run) -> str:
    """Each mixture part's share of the sequences trained on, from the last log record (metrics.jsonl)."""
    shares = next((r["data_mixture"] for r in reversed(run.train()) if "data_mixture" in r), None)
    if not shares:
        return "no mixture"
    return ", ".join(f"{name} {share:.1%}" for name, share in shares.items())


def provenance_rows(runs: list[Run]) -> list[list[str]]:
    provs = [r.info.get("provenance") or {} for r in runs]
    packages = sorted({name for p in provs for name in (p.get("packages") or {})})

    def git(p):
        g = p.get("git") or {}
        if not g.get("commit"):
            return f"unknown ({g.get('note', 'not recorded')})"
        return g["commit"] + (" (uncommitted changes)" if g.get("dirty") else "")

    def devices(p):
        listed = p.get("device_list") or []
        kinds = sorted({f"{d['kind']} ({d['platform']})" for d in listed})
        return f"{len(listed)} x {', '.join(kinds)}; processes {len({d['process'] for d in listed})}" if listed \
            else "not recorded"

    rows = [["chipwise version"] + [p.get("chipwise", "not recorded") for p in provs],
            ["git commit"] + [git(p) for p in provs],
            ["python"] + [p.get("python", "not recorded") for p in provs],
            ["platform"] + [p.get("platform", "not recorded") for p in provs],
            ["devices"] + [devices(p) for p in provs],
            ["attention"] + [r.info.get("attention", "unknown") for r in runs],
            ["initialised from"] + [(r.config.get("train") or {}).get("init_from") or "random" for r in runs]]
    rows += [[name] + [(p.get("packages") or {}).get(name) or "not recorded" for p in provs] for name in packages]
    return rows


def render(runs: list[Run], figures: list[tuple[str, str]]) -> str:
    names = ", ".join(r.name for r in runs)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>chipwise report: "
             f"{html.escape(names)}</title><style>{CSS}</style></head><body>",
             f"<h1>chipwise report</h1><p>Runs: {html.escape(names)}. Generated "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by chipwise {__version__}.</p>",
             "<h2>Summary</h2>", _table(["", *[r.name for r in runs]], summary_rows(runs))]
    for title, figure in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if figure.endswith(".png"):
            parts.append(f"<img src='{html.escape(figure)}' alt='{html.escape(title)}'>")
        else:
            parts.append(f"<p class='note'>{html.escape(figure)}</p>")
    parts.append("<h2>Provenance</h2>")
    parts.append(_table(["", *[r.name for r in runs]], provenance_rows(runs)))
    parts.append("<h2>Configuration</h2>")
    for r in runs:
        parts.append(f"<h3>{html.escape(r.name)}</h3><pre>{html.escape(r.config_text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above `path` that exists: the staging folder goes there, so a failed report creates
    no parent folders, and it is on the same file system as `path` (whose missing parents cannot be mounts)."""
    parent = path.absolute().parent
    while not parent.is_dir():
        parent = parent.parent
    return parent


def _staging_dir(out_dir: Path) -> Path:
    """A new hidden folder beside `out_dir`, or inside it where only DIR itself is writable."""
    # os.mkdir, not tempfile.mkdtemp: the folder may become DIR itself, so it gets the umask's mode, not 0o700.
    name = f".{out_dir.name or 'report'}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    places = [_existing_ancestor(out_dir)] + ([out_dir] if out_dir.is_dir() else [])
    for place in places:
        try:
            (place / name).mkdir()
            return place / name
        except PermissionError:
            continue
    raise ChipwiseError(f"cannot write a report at {out_dir}: permission denied in {places[-1]}; "
                        f"choose an --out you can write to")


def _install(staged: Path, out_dir: Path) -> None:
    """Move a complete report from `staged` into `out_dir`: renames only, so nothing here draws or can fail halfway
    through a figure. A new directory arrives in one rename; into an existing one (empty, or an old report being
    overwritten) the figures go first and index.html last, and figures the new report has no use for are removed
    while anything else the user keeps in DIR stays."""
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, out_dir)
        return
    written = {p.name for p in staged.iterdir()}
    for name in charts.FILES:
        if name not in written:  # an old figure this report replaced with a note
            (out_dir / name).unlink(missing_ok=True)
    for name in sorted(written - {PAGE}) + [PAGE]:
        shutil.move(staged / name, out_dir / name)  # a rename; a copy where DIR is a mount of its own


def write_report(run_dirs: list[str], out: str, overwrite: bool = False) -> Path:
    runs = load_runs(run_dirs)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ChipwiseError(f"--out {out} is a file; give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ChipwiseError(f"--out {out} is not empty; choose a new directory or pass --overwrite")
        if not (out_dir / PAGE).is_file():
            raise ChipwiseError(f"refusing to overwrite {out}: it holds no {PAGE}, so it is not a chipwise report")
    # Drawn in a staging folder and moved into place only once complete: a report that fails midway leaves DIR
    # as it was (absent, empty or the old report), so the retry is not refused as "not empty".
    staged = _staging_dir(out_dir)
    try:
        figures = [(title, draw(runs, staged)) for title, draw in charts.CHARTS]
        (staged / PAGE).write_text(render(runs, figures), encoding="utf-8")
        _install(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir / PAGE

