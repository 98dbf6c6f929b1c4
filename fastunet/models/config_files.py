"""Config files: fastunet configs as YAML/JSON, and mmseg's Python configs of the UNet family.

``fastunet.get_config(path)`` (and every ``--config``) reads a file when given one:

- ``.yaml`` / ``.yml`` / ``.json``: a fastunet config, the dict that
  ``python -m fastunet.train --print-config NAME`` prints (``model``, ``data``, ``train``; an
  optional ``name``, else the file's stem names the run). ``_base_: NAME`` (a built-in config
  name, or another YAML/JSON file relative to this one; a list for several) starts from that
  config, and the file then only holds what differs: dicts merge key by key, anything else
  replaces, and ``_delete_: true`` inside a dict replaces the base's dict instead of merging.
  YAML needs PyYAML (``pip install pyyaml``); JSON is read without it.
- ``.py``: an mmseg 0.x or 1.x config (``configs/unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py`` and
  its ``_base_`` files) is *read, never executed*: each top-level ``name = value`` is evaluated
  from literals, ``dict(...)`` / ``[...]`` / ``(...)`` / ``{...}`` (with ``**`` unpacking), names
  assigned earlier in the same file, and arithmetic on numbers. ``_base_`` files are read the same
  way (paths relative to the file: keep mmseg's ``configs/`` layout) and merged as mmengine merges
  them. A value whose expression is anything else (a comprehension, a function call, mmengine's
  ``{{_base_.xxx}}``) is refused with its file and line only when it is needed; imports, ``with``,
  ``if``, loops and definitions are refused outright. From the result it takes the model
  (``SyncBN`` becomes ``BN``, converted back by distributed training), the training dataset (DRIVE,
  STARE, CHASE_DB1 or HRF), its pipeline settings and normalisation, and the SGD + poly schedule;
  the total batch is the per-GPU ``batch_size`` times the GPU count in the file name (``4xb4``),
  else times 4 (mmseg's published UNet runs used 4 GPUs).

Lists of plain values read from files become tuples, as in the built-in configs, so a printed
config loads back equal to the original.
"""
import ast
import copy
import difflib
import json
import os
import re

__all__ = ["ConfigFileError", "CONFIG_FILE_SUFFIXES", "is_config_file", "load_config_file",
           "config_text"]

CONFIG_FILE_SUFFIXES = (".py", ".json", ".yaml", ".yml")
_TOP_KEYS = ("name", "model", "data", "train")


class ConfigFileError(ValueError):
    """A config file that cannot be read or is not a config: the message is one line naming the
    file (and the line, for mmseg files)."""


def is_config_file(text):
    """Whether ``text`` names a config file by its suffix (the file may not exist)."""
    return isinstance(text, (str, os.PathLike)) and os.fspath(text).lower().endswith(
        CONFIG_FILE_SUFFIXES)


def load_config_file(path):
    """The fastunet config (a fresh dict) a YAML/JSON/mmseg-``.py`` file describes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigFileError(f"config file {path} " + (
            "is a folder" if os.path.isdir(path) else "not found"))
    stem = os.path.splitext(os.path.basename(path))[0]
    if path.lower().endswith(".py"):
        return _from_mmseg(_read_mmseg(path, ()), stem, path)
    cfg = _read_structured(path, ())
    cfg.setdefault("name", stem)
    _check_layout(cfg, path)
    return _tuples(cfg)


def config_text(cfg, fmt="yaml"):
    """``cfg`` as the text of a YAML or JSON config file (without its ``name``: a loaded file is
    named after itself). YAML needs PyYAML."""
    plain = _lists({k: v for k, v in cfg.items() if k != "name"})
    if fmt == "json":
        return json.dumps(plain, indent=2) + "\n"
    import yaml

    head = (f"# fastunet config, from '{cfg.get('name')}'. Use: python -m fastunet.train "
            f"--config THIS_FILE\n")
    return head + yaml.dump(plain, Dumper=_yaml_dumper(yaml), sort_keys=False, width=100)


def _yaml_dumper(yaml):
    """Block style, except one-line lists of plain values and small dicts of them."""
    class Dumper(yaml.SafeDumper):
        pass

    def flat(items):
        return all(not isinstance(v, (dict, list)) for v in items)

    Dumper.add_representer(list, lambda d, v: d.represent_sequence(
        "tag:yaml.org,2002:seq", v, flow_style=flat(v)))
    Dumper.add_representer(dict, lambda d, v: d.represent_mapping(
        "tag:yaml.org,2002:map", v, flow_style=len(v) <= 4 and flat(v.values())))
    return Dumper


# ---------------------------------------------------------------- merging and normalising

def _merge(base, child):
    """mmengine's merge: dicts merge key by key unless the child's has ``_delete_=True``."""
    out = dict(base)
    for key, value in child.items():
        current = out.get(key)
        if isinstance(value, dict) and not value.get("_delete_", False):
            if isinstance(current, dict):
                out[key] = _merge(current, value)
                continue
            if isinstance(current, _Unsupported):
                continue  # merged into a value that was not evaluated: still unknown
        out[key] = _drop_delete(value)
    return out


def _drop_delete(value):
    if isinstance(value, dict):
        return {k: _drop_delete(v) for k, v in value.items() if k != "_delete_"}
    return value


def _tuples(value):
    """Lists of plain values -> tuples (the built-in configs' form); other lists stay lists."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_tuples(v) for v in value]
        return tuple(items) if all(not isinstance(v, (dict, list)) for v in items) else items
    return value


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _base_list(base, path):
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, (list, tuple)) or not all(isinstance(b, str) for b in bases):
        raise ConfigFileError(f"{path}: _base_ must be a file name or a list of them, got "
                              f"{base!r}")
    return list(bases)


# ---------------------------------------------------------------- YAML / JSON

def _parse_structured(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    try:
        import yaml
    except ImportError:
        try:  # JSON is YAML: a config printed as JSON (no PyYAML) into a .yaml file still loads
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigFileError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or "
                                  f"write the config as JSON (.json)") from None
    try:
        return yaml.load(text, Loader=_yaml_loader(yaml))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigFileError(f"{path}: not valid YAML ({where}"
                              f"{getattr(e, 'problem', None) or e})") from None


def _yaml_loader(yaml):
    """PyYAML's safe loader that also reads 1e-3 as a number (YAML 1.1 wants 1.0e-3)."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def _read_structured(path, stack):
    from .configs import ConfigKeyError, get_config

    real = os.path.realpath(path)
    if real in stack:
        raise ConfigFileError(f"{path}: _base_ files include each other in a cycle")
    data = _parse_structured(path)
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: a config file holds a mapping (model:, data:, train:), "
                              f"not a {type(data).__name__}")
    merged = {}
    for base in _base_list(data.pop("_base_", []), path):
        base_path = os.path.join(os.path.dirname(path), base)
        if base.lower().endswith((".json", ".yaml", ".yml")):
            if not os.path.isfile(base_path):
                raise ConfigFileError(f"{path}: _base_ file {base} not found (looked for "
                                      f"{base_path})")
            merged = _merge(merged, _read_structured(base_path, stack + (real,)))
        elif base.lower().endswith(".py"):
            raise ConfigFileError(f"{path}: _base_ {base}: a YAML/JSON config builds on built-in "
                                  f"config names or YAML/JSON files; load an mmseg .py config "
                                  f"directly instead")
        else:
            try:
                base_cfg = get_config(base)
            except ConfigKeyError as e:
                raise ConfigFileError(f"{path}: _base_: {e}") from None
            base_cfg.pop("name")
            merged = _merge(merged, base_cfg)
    return _merge(merged, data)


def _check_layout(cfg, path):
    from .configs import get_config, list_configs

    unknown = [k for k in cfg if k not in _TOP_KEYS]
    if unknown:
        raise ConfigFileError(f"{path}: unknown top-level key {unknown[0]!r}"
                              f"{_hint(unknown[0], _TOP_KEYS)} (a config holds "
                              f"{', '.join(_TOP_KEYS)})")
    for part in ("model", "data", "train"):
        if not isinstance(cfg.get(part), dict):
            raise ConfigFileError(f"{path}: '{part}' is missing or not a mapping (start from "
                                  f"python -m fastunet.train --print-config NAME, or add "
                                  f"_base_: NAME)")
    known = {part: set() for part in ("data", "train")}
    for name in list_configs():
        for part in known:
            known[part].update(get_config(name)[part])
    for part, keys in known.items():
        for key in cfg[part]:
            if key not in keys:
                raise ConfigFileError(f"{path}: unknown key '{part}.{key}'"
                                      f"{_hint(key, keys, part + '.')}")


def _hint(key, choices, prefix=""):
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


# ---------------------------------------------------------------- mmseg .py, read with ast

class _Unsupported:
    """A value the reader did not evaluate; an error only if the config needs it."""

    def __init__(self, what, path, line):
        self.message = (f"{path}:{line}: {what} is not supported (fastunet reads mmseg configs "
                        f"without running them: literals, dict(...), names assigned above in "
                        f"the same file, arithmetic, _base_)")

    def __repr__(self):
        return "<not evaluated>"


_STATEMENTS = {ast.Import: "an import", ast.ImportFrom: "an import", ast.With: "a with block",
               ast.If: "an if statement", ast.For: "a for loop", ast.While: "a while loop",
               ast.FunctionDef: "a function definition", ast.ClassDef: "a class definition",
               ast.AugAssign: "an augmented assignment (+= ...)", ast.Try: "a try block"}
_EXPRESSIONS = {ast.ListComp: "a list comprehension", ast.DictComp: "a dict comprehension",
                ast.SetComp: "a set comprehension", ast.GeneratorExp: "a generator expression",
                ast.Lambda: "a lambda", ast.IfExp: "a conditional expression",
                ast.Attribute: "attribute access", ast.Subscript: "indexing",
                ast.JoinedStr: "an f-string", ast.Compare: "a comparison",
                ast.BoolOp: "and/or", ast.Starred: "* unpacking"}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b}


def _read_mmseg(path, stack):
    """The merged top-level names of an mmseg config and its ``_base_`` files."""
    real = os.path.realpath(path)
    if real in stack:
        raise ConfigFileError(f"{path}: _base_ files include each other in a cycle")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ConfigFileError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    names = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                   [stmt.target] if isinstance(stmt, ast.AnnAssign) and stmt.value else None)
        if targets is None or not all(isinstance(t, ast.Name) for t in targets):
            what = _STATEMENTS.get(type(stmt), f"a {type(stmt).__name__} statement")
            if targets is not None:
                what = "an assignment to something other than a plain name"
            raise ConfigFileError(_Unsupported(what, path, stmt.lineno).message)
        value = _evaluate(stmt.value, names, path)
        for t in targets:
            names[t.id] = value
    merged = {}
    bases = names.pop("_base_", [])
    if isinstance(bases, _Unsupported):
        raise ConfigFileError(bases.message)
    for base in _base_list(bases, path):
        if "::" in base or "{{" in base:
            raise ConfigFileError(f"{path}: _base_ {base!r}: configs of other packages and "
                                  f"mmengine's path variables are not supported")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigFileError(f"{path}: its _base_ file {base} is not at {base_path}: keep "
                                  f"mmseg's configs/ folder layout (or use the built-in config "
                                  f"name, python -m fastunet.train --help lists them)")
        merged = _merge(merged, _read_mmseg(base_path, stack + (real,)))
    return _merge(merged, names)


def _evaluate(node, names, path):
    """The value of an expression of the supported subset, else an _Unsupported."""
    line = getattr(node, "lineno", "?")
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            return _Unsupported("* unpacking", path, line)
        items = [_evaluate(e, names, path) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        pairs = [(None if k is None else _evaluate(k, names, path), _evaluate(v, names, path))
                 for k, v in zip(node.keys, node.values)]
        return _build_dict(pairs, path, line)
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
            return _Unsupported(f"calling {node.func.id}()" if isinstance(node.func, ast.Name)
                                else "a function call", path, line)
        if node.args:
            return _Unsupported("dict() with positional arguments", path, line)
        return _build_dict([(kw.arg, _evaluate(kw.value, names, path))
                            for kw in node.keywords], path, line)
    if isinstance(node, ast.Name):
        if node.id in names:
            return copy.deepcopy(names[node.id])
        return _Unsupported(f"the name {node.id!r} (not assigned above in this file; mmseg "
                            f"configs cannot see their _base_ files' names either)", path, line)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, names, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
        return value if isinstance(value, _Unsupported) else _Unsupported(
            "a sign on a non-number", path, line)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _evaluate(node.left, names, path), _evaluate(node.right, names, path)
        for v in (a, b):
            if isinstance(v, _Unsupported):
                return v
        try:
            return _BINARY[type(node.op)](a, b)
        except (TypeError, ZeroDivisionError, OverflowError) as e:
            return _Unsupported(f"this arithmetic ({e})", path, line)
    if isinstance(node, ast.Set) and any(isinstance(e, ast.Set) for e in node.elts):
        return _Unsupported("mmengine's {{_base_.xxx}} substitution", path, line)
    return _Unsupported(_EXPRESSIONS.get(type(node), f"a {type(node).__name__} expression"),
                        path, line)


def _build_dict(pairs, path, line):
    out = {}
    for key, value in pairs:
        if key is None:  # ** unpacking
            if isinstance(value, _Unsupported):
                return value
            if not isinstance(value, dict):
                return _Unsupported("** unpacking of a non-dict", path, line)
            out.update(value)
        elif isinstance(key, _Unsupported):
            return key
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- mmseg -> fastunet

_MMSEG_DATASETS = {"DRIVEDataset": "DRIVE", "STAREDataset": "STARE",
                   "ChaseDB1Dataset": "CHASE_DB1", "HRFDataset": "HRF"}


class _Reader:
    """Looks values up in the merged mmseg config, failing in one line naming what is missing
    or which file line holds an expression that was not evaluated."""

    def __init__(self, mm, path):
        self.mm, self.path = mm, path

    def get(self, *keys, default=None, required=False):
        node = self.mm
        for key in keys:
            if isinstance(node, _Unsupported):
                raise ConfigFileError(node.message)
            if not isinstance(node, dict) or key not in node:
                if required:
                    raise ConfigFileError(f"{self.path}: no {'.'.join(keys)} (with its _base_ "
                                          f"files)")
                return default
            node = node[key]
        return self.concrete(node)

    def concrete(self, value):
        """value, or the one-line error of the first part of it that was not evaluated."""
        if isinstance(value, _Unsupported):
            raise ConfigFileError(value.message)
        for item in (value.values() if isinstance(value, dict) else
                     value if isinstance(value, (list, tuple)) else ()):
            self.concrete(item)
        return value


def _from_mmseg(mm, name, path):
    r = _Reader(mm, path)
    model = copy.deepcopy(r.get("model", required=True))
    preprocessor = model.pop("data_preprocessor", None) or r.get("data_preprocessor") or {}
    for key in ("train_cfg", "init_cfg"):
        model.pop(key, None)
    if model.get("pretrained", "absent") is None:
        del model["pretrained"]
    _sync_bn_to_bn(model)
    dataset = _train_dataset(r)
    data = _data_part(r, dataset, preprocessor, model)
    cfg = {"name": name, "model": model, "data": data, "train": _train_part(r, name)}
    return _tuples(cfg)


def _sync_bn_to_bn(node):
    if isinstance(node, dict):
        if node.get("type") == "SyncBN" and "requires_grad" in node:
            node["type"] = "BN"
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, list):
        for value in node:
            _sync_bn_to_bn(value)


def _train_dataset(r):
    """The training dataset dict (under RepeatDataset wrappers) of a 1.x or 0.x config."""
    node = r.get("train_dataloader") or r.get("data", "train")
    if node is None:
        raise ConfigFileError(f"{r.path}: no training dataset (train_dataloader in mmseg 1.x, "
                              f"data.train in 0.x)")
    if "dataset" in node and "pipeline" not in node:
        node = node["dataset"]
    while isinstance(node, dict) and node.get("type") == "RepeatDataset":
        node = node.get("dataset")
    return r.concrete(node)


def _data_part(r, dataset, preprocessor, model):
    from . import configs

    kind = dataset.get("type")
    if kind not in _MMSEG_DATASETS:
        raise ConfigFileError(f"{r.path}: dataset type {kind!r} is not supported: fastunet reads "
                              f"{', '.join(_MMSEG_DATASETS)} (or your own images: print a "
                              f"config with --print-config and set data.dataset: folder)")
    name = _MMSEG_DATASETS[kind]
    info = next(v for v in configs._DATASETS.values() if v[2] == name)
    _tag, _suffix, _name, img_scale, image_size, crop, _stride, n_train, n_val = info
    steps = {t.get("type"): t for t in r.concrete(dataset.get("pipeline") or [])
             if isinstance(t, dict)}
    resize = steps.get("RandomResize") or steps.get("Resize") or {}
    crop_step = steps.get("RandomCrop")
    if crop_step is None or not (resize.get("scale") or resize.get("img_scale")):
        raise ConfigFileError(f"{r.path}: the training pipeline needs RandomResize (or Resize) "
                              f"and RandomCrop, as mmseg's retinal-vessel configs have")
    norm = steps.get("Normalize") or preprocessor
    pad = steps.get("Pad") or preprocessor
    flip = steps.get("RandomFlip", {})
    data = configs._data(name, dataset.get("data_root", f"data/{name}"),
                         tuple(resize.get("scale") or resize.get("img_scale")), image_size,
                         crop, n_train, n_val)
    data.update(crop_size=tuple(crop_step["crop_size"]),
                ratio_range=tuple(resize.get("ratio_range", data["ratio_range"])),
                cat_max_ratio=crop_step.get("cat_max_ratio", 1.0),
                flip_prob=flip.get("prob", flip.get("flip_ratio", 0.0)),
                photometric_distortion="PhotoMetricDistortion" in steps,
                mean=tuple(norm.get("mean", data["mean"])), std=tuple(norm.get("std", data["std"])),
                pad_val=pad.get("pad_val", 0), seg_pad_val=pad.get("seg_pad_val", 255),
                ignore_index=model.get("decode_head", {}).get("ignore_index", 255))
    return data


def _train_part(r, name):
    from . import configs

    optimizer = r.get("optim_wrapper", "optimizer") or r.get("optimizer", required=True)
    if optimizer.get("type") != "SGD":
        raise ConfigFileError(f"{r.path}: optimizer {optimizer.get('type')!r} is not supported: "
                              f"fastunet trains with SGD + poly decay, as the UNet configs")
    schedulers = r.get("param_scheduler")
    schedulers = [schedulers] if isinstance(schedulers, dict) else schedulers
    if schedulers is not None:
        other = [s.get("type") for s in schedulers if s.get("type") != "PolyLR"]
        if other or not schedulers:
            raise ConfigFileError(f"{r.path}: param_scheduler {other or schedulers} is not "
                                  f"supported: fastunet trains with one PolyLR")
        poly = schedulers[0]
        min_lr, power = poly.get("eta_min", 1e-4), poly.get("power", 0.9)
    else:
        lr_config = r.get("lr_config", default={})
        if lr_config.get("policy", "poly") != "poly":
            raise ConfigFileError(f"{r.path}: lr_config policy {lr_config['policy']!r} is not "
                                  f"supported: fastunet trains with poly decay")
        min_lr, power = lr_config.get("min_lr", 1e-4), lr_config.get("power", 0.9)
    max_iters = (r.get("train_cfg", "max_iters") or r.get("runner", "max_iters")
                 or r.get("total_iters"))
    if max_iters is None:
        raise ConfigFileError(f"{r.path}: no train_cfg.max_iters (mmseg 1.x) or "
                              f"runner.max_iters (0.x)")
    per_gpu = r.get("train_dataloader", "batch_size") or r.get("data", "samples_per_gpu") or 4
    gpus = re.search(r"(\d+)xb(\d+)", name)
    interval = configs._train()["eval_interval"]
    train = configs._train(max_iters=max_iters, batch_size=per_gpu * (int(gpus[1]) if gpus
                                                                      else 4),
                           lr=optimizer.get("lr", 0.01), interval=interval)
    train.update(momentum=optimizer.get("momentum", 0.9),
                 weight_decay=optimizer.get("weight_decay", 0.0), min_lr=min_lr, power=power,
                 eval_interval=(r.get("train_cfg", "val_interval")
                                or r.get("evaluation", "interval") or interval),
                 checkpoint_interval=(r.get("default_hooks", "checkpoint", "interval")
                                      or r.get("checkpoint_config", "interval") or interval))
    return train
