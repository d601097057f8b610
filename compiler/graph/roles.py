"""Layer roles from the dataflow of one traced forward: which nn.Linear is an attention q/k/v projection, the
attention output projection, an FFN up or down projection, or a head, whatever the model family names it.

No library does this: torch.fx cannot trace transformers 5 models reliably and torch.export is slow and
fails on some of them, so one eager forward is recorded with a TorchFunctionMode (every torch function
call with its input and output tensors) and the roles are read from that graph:

    attention_qkv     its output reaches a q@k^T product (feeding a softmax) or is the V of softmax@V
    attention_output  its input is the softmax@V product (through reshapes only)
    ffn_up            its output feeds an activation (gelu, relu, silu ...) whose result feeds an ffn_down
    ffn_down          its input is an activation output (or act(x) * gate) and its output a residual add
    head              any other Linear downstream of the blocks (pooler, classifier, prediction head)
    other             any other Linear (e.g. an embedding projection)

A recipe names layers by role (``ffn_down``) or by role and block (``ffn_down[0]``, ``ffn_down[-1]``: the
first / last block's, in forward order); any other string stays an fnmatch pattern over module names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

ROLES = ("attention_qkv", "attention_output", "ffn_up", "ffn_down", "head", "other")
BLOCK_ROLES = ROLES[:4]

# ops that only move or relabel values: dataflow is followed through them unchanged
_SHAPE_OPS = {
    "view", "reshape", "transpose", "permute", "contiguous", "dropout", "__getitem__", "chunk", "split", "unbind",
    "to", "float", "half", "type", "type_as", "expand", "flatten", "unflatten", "squeeze", "unsqueeze", "clone",
    "narrow", "select", "t", "mT", "feature_dropout", "alpha_dropout", "tensor_split", "split_with_sizes",
}
_ACTIVATIONS = {"gelu", "relu", "silu", "tanh", "sigmoid", "mish", "gelu_", "relu_", "hardswish", "elu", "selu",
                "leaky_relu", "softplus", "erf"}
_MATMULS = {"matmul", "__matmul__", "bmm", "einsum", "baddbmm"}
_ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}
_SELECTOR = re.compile(r"^(?P<role>[a-z_]+)(\[(?P<index>-?\d+)\])?$")


@dataclass
class _Node:
    op: str
    inputs: list[int]  # node ids of the tensor inputs
    linear: str | None = None  # module name, for F.linear calls of an nn.Linear
    consumers: list[int] = field(default_factory=list)


@dataclass
class LayerRoles:
    """Every nn.Linear of a model (module name, forward order) with its role and its index among its role."""

    role: dict[str, str]
    index: dict[str, int]

    def names(self, role: str) -> list[str]:
        return [n for n, r in self.role.items() if r == role]

    def select(self, selectors: Iterable[str]) -> list[str]:
        """Module names a list of role selectors picks (``role`` or ``role[i]``); non-role strings are ignored."""
        out: list[str] = []
        for sel in selectors:
            m = _SELECTOR.match(str(sel))
            if not m or m.group("role") not in ROLES:
                continue
            names = self.names(m.group("role"))
            if m.group("index") is not None:
                i = int(m.group("index"))
                names = [names[i]] if -len(names) <= i < len(names) else []
            out += [n for n in names if n not in out]
        return out

    def as_dict(self) -> dict[str, str]:
        return dict(self.role)


def is_role_selector(text: str) -> bool:
    m = _SELECTOR.match(str(text))
    return bool(m) and m.group("role") in ROLES


def bad_selector(text: str) -> str | None:
    """Why a string that looks like a role selector is not one (a misspelt role), or None."""
    m = _SELECTOR.match(str(text))
    if not m or m.group("role") in ROLES or "_" not in m.group("role"):
        return None
    import difflib

    close = difflib.get_close_matches(m.group("role"), ROLES, n=1)
    return f"did you mean {close[0]!r}?" if close else f"roles are {', '.join(ROLES)}"


def expand_patterns(patterns: Sequence[str], roles: LayerRoles | None) -> list[str]:
    """Layer patterns with role selectors replaced by the module names they pick (fnmatch of an exact module
    name matches that module only); other patterns are kept as they are."""
    out: list[str] = []
    for p in patterns:
        if is_role_selector(p):
            if roles is None:
                raise ValueError(f"layer role {p!r} used, but the model's roles were not computed")
            out += [n for n in roles.select([p]) if n not in out]
        elif p not in out:
            out.append(str(p))
    return out


def _flat(x, out: list) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _flat(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _flat(y, out)
    return out


def trace_dataflow(module, args: Sequence, kwargs: Mapping | None = None) -> dict[int, _Node]:
    """One forward of ``module`` recorded as a graph of torch function calls (node id -> node)."""
    import torch
    from torch.overrides import TorchFunctionMode

    linear_of = {id(m.weight): name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    nodes: dict[int, _Node] = {}
    producer: dict[int, int] = {}  # id(tensor) -> node id
    keep: list = []  # tensors stay alive so their ids are not reused during the trace

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            result = func(*a, **kw)
            name = getattr(func, "__name__", str(func))
            if name == "__set__":
                return result
            if name == "__get__":  # a tensor property (.T, .mT, .data): a relabelling
                name = "view"
            outs = _flat(result, [])
            if not outs:
                return result
            ins = _flat(list(a) + list(kw.values()), [])
            linear = linear_of.get(id(a[1])) if name == "linear" and len(a) > 1 else None
            if name == "linear" and linear is None and "weight" in kw:
                linear = linear_of.get(id(kw["weight"]))
            nid = len(nodes)
            node = _Node(name, [producer[id(t)] for t in ins if id(t) in producer], linear)
            nodes[nid] = node
            for i in set(node.inputs):
                nodes[i].consumers.append(nid)
            for t in outs:
                producer[id(t)] = nid
            keep.extend(outs)
            return result

    with torch.no_grad(), Recorder():
        module(*args, **dict(kwargs or {}))
    return nodes


def _through_shape(nodes: dict[int, _Node], nid: int, forward: bool, limit: int = 12) -> list[int]:
    """The first non-shape nodes reached from nid (its consumers or producers), following shape ops."""
    seen, out, todo = set(), [], [(nid, 0)]
    while todo:
        cur, depth = todo.pop()
        nxt = nodes[cur].consumers if forward else nodes[cur].inputs
        for j in nxt:
            if j in seen:
                continue
            seen.add(j)
            if nodes[j].op in _SHAPE_OPS and depth < limit:
                todo.append((j, depth + 1))
            else:
                out.append(j)
    return out


def _reaches(nodes: dict[int, _Node], nid: int, ok, depth: int, stop=lambda n: False) -> bool:
    """Whether a consumer path of at most `depth` compute ops (shape ops free) from nid reaches a node
    for which ok(node id) holds, without passing a node where stop(node) holds."""
    frontier, seen = [nid], {nid}
    for _ in range(depth):
        nxt = []
        for cur in frontier:
            for j in _through_shape(nodes, cur, forward=True):
                if j in seen:
                    continue
                seen.add(j)
                if ok(j):
                    return True
                if not stop(nodes[j]):
                    nxt.append(j)
        frontier = nxt
    return False


def classify(nodes: dict[int, _Node]) -> LayerRoles:
    """Roles of the Linear calls of a traced forward (see the module docstring)."""
    softmax = {i for i, n in nodes.items() if n.op in ("softmax", "_softmax", "log_softmax")}
    sdpa = {i for i, n in nodes.items() if n.op == "scaled_dot_product_attention"}

    def barrier(n: _Node) -> bool:
        return n.linear is not None or n.op in ("layer_norm", "rms_norm", "softmax")

    # a context product: a matmul with an input that is a softmax (through shape ops / dropout)
    context = {i for i, n in nodes.items() if n.op in _MATMULS
               and any(j in softmax for x in n.inputs for j in ([x] if nodes[x].op not in _SHAPE_OPS
                                                                  else _through_shape(nodes, x, False)))}
    # a score product: a matmul whose output reaches a softmax within a few elementwise ops
    scores = {i for i, n in nodes.items() if n.op in _MATMULS and i not in context
              and _reaches(nodes, i, lambda j: j in softmax, depth=4, stop=barrier)}
    attention_in = scores | context | sdpa
    linears = [i for i, n in nodes.items() if n.linear is not None]

    def input_from(i: int, ok) -> bool:
        srcs = [j for x in nodes[i].inputs[:1] for j in ([x] if nodes[x].op not in _SHAPE_OPS
                                                          else _through_shape(nodes, x, False))]
        return any(ok(j) for j in srcs)

    def is_act(j: int) -> bool:
        n = nodes[j]
        if n.op in _ACTIVATIONS:
            return True
        # gated units (GLU / GeGLU): act(x) * gate, or an erf-built GELU: 0.5 * x * (1 + erf(x / sqrt 2))
        if n.op in ("mul", "__mul__", "__rmul__"):
            return any(nodes[x].op in _ACTIVATIONS or (nodes[x].op in ("mul", "__mul__", "__rmul__", "add", "__add__",
                                                                      "__radd__")
                                                       and any(nodes[y].op == "erf" for y in nodes[x].inputs))
                       for x in n.inputs)
        return False

    role: dict[str, str] = {}
    order: list[str] = []
    for i in linears:
        name = nodes[i].linear
        if name in role:  # a Linear called twice keeps its first role
            continue
        order.append(name)
        if input_from(i, lambda j: j in context or j in sdpa):
            role[name] = "attention_output"
        elif _reaches(nodes, i, lambda j: j in attention_in, depth=8, stop=barrier):
            role[name] = "attention_qkv"
        elif input_from(i, is_act) and _reaches(nodes, i, lambda j: nodes[j].op in _ADDS, depth=2, stop=barrier):
            role[name] = "ffn_down"
        else:
            role[name] = ""
    downs = {i for i in linears if role.get(nodes[i].linear) == "ffn_down"}
    for i in linears:
        name = nodes[i].linear
        if role[name] == "" and _reaches(nodes, i, lambda j: j in downs, depth=4,
                                         stop=lambda n: n.linear is not None or n.op in ("layer_norm", "rms_norm")):
            role[name] = "ffn_up"
    # a Linear after the blocks (its input derived from a block's output) is a head; anything else is other
    block_nodes = {i for i in linears if role[nodes[i].linear]}
    for i in linears:
        name = nodes[i].linear
        if role[name]:
            continue
        todo, seen, hit = list(nodes[i].inputs), set(), False
        while todo and not hit:
            j = todo.pop()
            if j in seen:
                continue
            seen.add(j)
            hit = j in block_nodes
            todo.extend(nodes[j].inputs)
        role[name] = "head" if hit else "other"
    index: dict[str, int] = {}
    counts: dict[str, int] = {}
    for name in order:
        index[name] = counts.get(role[name], 0)
        counts[role[name]] = index[name] + 1
    return LayerRoles(role={n: role[n] for n in order}, index=index)


def find_roles(module, args: Sequence, kwargs: Mapping | None = None) -> LayerRoles:
    """The role of every nn.Linear of ``module`` that runs in a forward on ``args``."""
    return classify(trace_dataflow(module, args, kwargs))


def vocab_rows(module) -> int:
    """How many token ids a model's input_ids may hold: the rows of its word-embedding table (transformers'
    get_input_embeddings on the model or the one it wraps), else of its largest embedding table."""
    import torch

    for m in module.modules():
        get = getattr(m, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if isinstance(emb, torch.nn.Embedding):
            return int(emb.num_embeddings)
    return max((m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)), default=30522)


def example_inputs(input_names: Sequence[str], seq: int = 8, vocab: int = 30522):
    """A small valid positional feed (batch 2, ``seq`` tokens, one padded position) for a roles trace or an
    export; token ids wrap below ``vocab`` (vocab_rows), so a model with a small vocabulary runs it too."""
    import torch

    ids = torch.tensor([[t % vocab for t in [101] + [2000 + i for i in range(seq - 2)] + [102]]] * 2,
                       dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return [feed[n] for n in input_names]
