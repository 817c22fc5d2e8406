"""The ``README.md`` of an exported model: what it is, what it scored, and how to load it.

A Hugging Face model card (YAML front matter, then Markdown) written from the run itself:
the backbone, each task's labels and data files, the dev scores ``metrics.jsonl`` recorded
for the exported step, the full config, and loading snippets for PyTorch and for mtl_jax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl_jax.config import Config, TaskConfig
from mtl_jax.metrics_log import read_metrics

SCORES = ("accuracy", "macro_f1", "loss")


def dev_scores(workdir: str | Path, step: int, tasks: tuple[str, ...]) -> tuple[int | None, dict]:
    """The last dev evaluation at or before ``step``: ``(its step, {task: {metric: value}})``."""
    events = [
        e for e in read_metrics(workdir) if e.get("split") == "dev" and int(e["step"]) <= step
    ]
    if not events:
        return None, {}
    event = max(events, key=lambda e: int(e["step"]))
    scores = {
        task: {m: event[f"{task}/{m}"] for m in SCORES if f"{task}/{m}" in event} for task in tasks
    }
    return int(event["step"]), scores


def model_card(config: Config, info: dict[str, Any], heads: dict[str, Any], workdir: Path) -> str:
    """The model card text for an export described by ``info`` (its ``mtl_jax.json``)."""
    run, emb = info["run"], info["embedding"]
    tags = "\n".join(f"- {tag}" for tag in ("mtl_jax", "sentence-transformers", "bert"))
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        f"tags:\n{tags}",
        "---",
        "",
        "# A multi-task sentence model trained with mtl_jax",
        "",
        f"- **Backbone**: `{run['backbone']}`, fine-tuned from layer "
        f"`hidden_states[{run['layer']}]` of its {run['backbone_layers']} layers; this "
        f"directory holds the {run['exported_layers']} layers up to it, so its last layer "
        "*is* the run's pooled layer.",
        f"- **Sentence embedding**: {emb['pooling']} pooling"
        + (", L2-normalised" if emb["normalize"] else "")
        + f", {heads['input_dim']} dimensions, at most {emb['max_length']} tokens.",
        f"- **Checkpoint**: {_checkpoint_words(run)} of the run `{run['workdir']}`.",
        f"- **Pooler** (`BertModel.pooler`, not part of the embedding): {info['pooler']}.",
        "",
        "## Tasks",
        "",
        *_task_lines(config, heads),
        "",
        *_score_lines(workdir, run["step"], config, averaged="averaged_steps" in run),
        "",
        "## Use it",
        "",
        *_usage_lines(heads),
        "",
        "## The run's config",
        "",
        "```toml",
        config.to_toml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _task_lines(config: Config, heads: dict[str, Any]) -> list[str]:
    lines = [
        "| task | labels (logit order) | head | train data | dev data |",
        "|---|---|---|---|---|",
    ]
    synthetic = config.data.synthetic_train_rows > 0
    for task in config.tasks:
        layout = heads["tasks"][task.name]
        head = " -> ".join(str(w) for w in [heads["input_dim"], *layout["hidden"], task.num_labels])
        if task.own_layers:
            head = f"its own copy of the top {task.own_layers} layer(s), pooled -> " + head
        if synthetic:
            train = f"built-in synthetic sentences ({config.data.synthetic_train_rows} rows)"
            dev = f"built-in synthetic sentences ({config.data.synthetic_dev_rows} rows)"
        else:
            train, dev = f"`{task.train_file or '-'}`", f"`{task.dev_file or '-'}`"
        labels = ", ".join(task.labels)
        lines.append(f"| {task.name} | {labels} | {head} | {train} | {dev} |")
    lines += [_context_note(task) for task in config.tasks if task.context]
    return lines


def _context_note(task: TaskConfig) -> str:
    """How a task that reads neighbours wants its input (the embeddings are of windows)."""
    column = task.source_column
    source = f"the same `{column}`" if column else "the same file"
    return (
        f"\nThe {task.name} head reads each sentence joined (by a space) with up to "
        f"{task.context} sentence(s) before and after it from {source}, in order, as many "
        "as fit the model's length: give it such windows (`mtl-jax predict` builds them "
        + (f"from its input's `{column}` column)." if column else "from its input).")
    )


def _checkpoint_words(run: dict[str, Any]) -> str:
    ema = " (their EMA, `train.ema_decay`)" if run.get("weights") == "ema" else ""
    if "averaged_steps" in run:
        steps = ", ".join(str(s) for s in run["averaged_steps"])
        return f"the mean of the params{ema} of the checkpoints at steps {steps} (`average`)"
    return f"the `{run['checkpoint']}` one, step {run['step']}{ema},"


def _score_lines(workdir: Path, step: int, config: Config, averaged: bool = False) -> list[str]:
    at, scores = dev_scores(workdir, step, config.task_names)
    if at is None:
        return ["## Dev scores", "", "The run recorded no dev evaluation up to this step."]
    source = (
        f"the dev evaluation of the newest single checkpoint (step {at}), not of the average "
        "exported here (`mtl-jax eval --which average` scores that)"
        if averaged
        else f"the dev evaluation at step {at}"
    )
    lines = [
        "## Dev scores",
        "",
        f"From the run's `metrics.jsonl`, {source}:",
        "",
        "| task | " + " | ".join(SCORES) + " |",
        "|---|" + "---|" * len(SCORES),
    ]
    for task, values in scores.items():
        cells = [f"{values[m]:.4f}" if m in values else "-" for m in SCORES]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _usage_lines(heads: dict[str, Any]) -> list[str]:
    task = next((t for t, v in heads["tasks"].items() if not v["own_layers"]), "TASK")
    return [
        "Sentence embeddings with sentence-transformers (PyTorch):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/dir")',
        'embeddings = model.encode(["A quiet night in town."])',
        "```",
        "",
        "The BERT alone with transformers (its `last_hidden_state` is the pooled layer):",
        "",
        "```python",
        "from transformers import BertModel",
        "",
        'bert = BertModel.from_pretrained("path/to/this/dir", local_files_only=True)',
        "```",
        "",
        "A task head in PyTorch, from `heads.json`, over those embeddings:",
        "",
        "```python",
        "import json, torch",
        "from safetensors.torch import load_file",
        "",
        'layout = json.load(open("heads.json"))',
        'weights = load_file("heads.safetensors")',
        "",
        "def head(task):",
        "    layers = []",
        '    for layer in layout["tasks"][task]["layers"]:',
        '        if layer["type"] == "linear":',
        '            m = torch.nn.Linear(layer["in_features"], layer["out_features"])',
        '        elif layer["type"] == "layer_norm":',
        '            m = torch.nn.LayerNorm(weights[layer["weight"]].shape[0], eps=layer["eps"])',
        '        elif layer["type"] == "gelu":',
        "            m = torch.nn.GELU()",
        "        else:",
        '            m = torch.nn.Dropout(layer["p"])',
        '        if "weight" in layer:',
        '            m.weight.data = weights[layer["weight"]]',
        '            m.bias.data = weights[layer["bias"]]',
        "        layers.append(m)",
        "    return torch.nn.Sequential(*layers).eval()",
        "",
        f'logits = head("{task}")(torch.as_tensor(embeddings))',
        f'label = layout["tasks"]["{task}"]["labels"][int(logits.argmax(-1)[0])]',
        "```",
        "",
        *_own_layers_lines(heads),
        "With mtl_jax: `mtl-jax embed --model path/to/this/dir --input FILE --output OUT.npy`",
        "(it reads the pooling and normalisation above from `mtl_jax.json`), or",
        '`backbone = "path/to/this/dir"` with `layer = -1` in a config to train from it; the',
        "heads: `mtl_jax.export.load_heads(dir)` gives labels, the `TaskHeads` and their params.",
    ]


POOLING_LINES = {
    "mean": [
        '    m = batch["attention_mask"].unsqueeze(-1).float()',
        "    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)",
    ],
    "max": [
        '    m = batch["attention_mask"].unsqueeze(-1).bool()',
        "    pooled = states.masked_fill(~m, float('-inf')).max(1).values",
    ],
    "cls": ["    pooled = states[:, 0]"],
}


def _own_layers_lines(heads: dict[str, Any]) -> list[str]:
    """How a task with its own top layers reads a sentence, in PyTorch (none without)."""
    own = {task: v["own"] for task, v in heads["tasks"].items() if v["own_layers"]}
    if not own:
        return []
    task, spec = next(iter(own.items()))
    normalize = ["    pooled = torch.nn.functional.normalize(pooled, dim=-1)"]
    return [
        f"{', '.join(own)} read(s) its own copy of the encoder's top layers instead of the "
        "embedding: the BERT's `hidden_states[own.hidden_state]`, its own `BertLayer`s, the "
        "same pooling, then `head(task)` as above:",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        "from transformers.models.bert.modeling_bert import BertLayer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        "",
        "def own_pooled(task, texts):",
        '    spec = layout["tasks"][task]["own"]',
        '    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")',
        "    with torch.no_grad():",
        "        out = bert(**batch, output_hidden_states=True)",
        '        states = out.hidden_states[spec["hidden_state"]]',
        '        keep = batch["attention_mask"][:, None, None, :].float()  # additive mask',
        "        mask = (1.0 - keep) * torch.finfo(torch.float32).min",
        '        for prefix in spec["layers"]:',
        "            layer = BertLayer(bert.config).eval()",
        '            own = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}',
        "            layer.load_state_dict(own)",
        "            states = layer(states, attention_mask=mask)",
        "            states = states[0] if isinstance(states, tuple) else states  # transformers 4 / 5",
        *POOLING_LINES[spec["pooling"]],
        *(normalize if spec["normalize"] else []),
        "    return pooled",
        "",
        f'logits = head("{task}")(own_pooled("{task}", ["A quiet night in town."]))',
        "```",
        "",
    ]
