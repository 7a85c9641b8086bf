"""Drawings of a model's layer graph (Keras' plot_model): Graphviz DOT, Mermaid for Markdown, or SVG/PNG via `dot`.

One box per layer call with its name, type and output shape; one arrow per tensor a call reads.
"""
import shutil
import subprocess
from pathlib import Path

from dlcli.engine.layer import format_shape
from dlcli.errors import DlcliError

FORMATS = (".svg", ".png", ".dot", ".md")


def graph_rows(model) -> list[dict]:
    """Per call: an id, its label lines, and the ids it reads from (model.summary_rows in graph form)."""
    ids = {}
    rows = []
    for node, row in zip(model.graph.nodes, model.summary_rows()):
        ids[id(node)] = f"n{len(ids)}"
        rows.append({"id": ids[id(node)], "name": row["name"], "type": row["type"],
                     "shape": format_shape(row["output_shape"]),
                     "reads": [ids[id(t.node)] for t in node.inputs]})
    return rows


def to_dot(model) -> str:
    lines = [f'digraph "{_escape(model.name)}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];']
    for r in graph_rows(model):
        fill = ', fillcolor="#fdf1dc"' if r["type"] == "InputLayer" else ""
        lines.append(f'  {r["id"]} [label="{_escape(r["name"])}\\n{r["type"]}\\n{r["shape"]}"{fill}];')
        lines += [f"  {src} -> {r['id']};" for src in r["reads"]]
    return "\n".join(lines + ["}"]) + "\n"


def to_mermaid(model) -> str:
    """A Markdown document with a mermaid flowchart (GitHub and most editors draw it)."""
    lines = [f"# {model.name}", "", "```mermaid", "flowchart TD"]
    for r in graph_rows(model):
        label = f"{r['name']}<br/>{r['type']}<br/>{r['shape']}".replace('"', "'")
        lines.append(f'  {r["id"]}["{label}"]')
        lines += [f"  {src} --> {r['id']}" for src in r["reads"]]
    return "\n".join(lines + ["```"]) + "\n"


def check_graph_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise DlcliError(f"--graph {path}: the file must end in one of {', '.join(FORMATS)}", exit_code=2)
    if not path.parent.is_dir():  # a typo in the folder should not create it
        raise DlcliError(f"--graph {path}: the folder {path.parent} does not exist", exit_code=2)
    return path


def render_graph(model, path) -> str:
    """Write the drawing `path`'s suffix asks for; returns a sentence saying what was written (and any fallback)."""
    path = check_graph_path(path)
    suffix = path.suffix.lower()
    if suffix == ".md":
        path.write_text(to_mermaid(model), encoding="utf-8")
        return f"wrote {path} (a mermaid flowchart in Markdown)"
    dot_text = to_dot(model)
    if suffix == ".dot":
        path.write_text(dot_text, encoding="utf-8")
        return f"wrote {path} (Graphviz DOT; draw it with: dot -Tsvg {path} -o {path.with_suffix('.svg')})"
    dot = shutil.which("dot")
    if dot is None:
        fallback = path.with_suffix(".dot")
        fallback.write_text(dot_text, encoding="utf-8")
        return (f"Graphviz 'dot' is not on PATH, so {path} was not drawn; wrote {fallback} instead (install "
                f"graphviz and run: dot -T{suffix[1:]} {fallback} -o {path}, or use --graph FILE.md for mermaid)")
    result = subprocess.run([dot, f"-T{suffix[1:]}", "-o", str(path)], input=dot_text, text=True,
                            capture_output=True)
    if result.returncode != 0:
        raise DlcliError(f"graphviz dot failed drawing {path}: {result.stderr.strip()}")
    return f"wrote {path}"


def _escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')
