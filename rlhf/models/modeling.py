"""Loading the base model and tokenizer, attaching adapters, and loading what a stage saved.

Every stage goes through these functions, so a base is loaded the same way everywhere (dtype, revision,
``trust_remote_code``), and a run directory is turned back into a model in one place.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.models import methods
from rlhf.config import AdapterConfig, ModelConfig, model_config_of
from rlhf.errors import UserError
from rlhf.names import is_local, torch_dtype
from rlhf.models.methods import unwrap

# Used when a tokenizer has no chat template of its own. The assistant turn carries generation markers (TRL's
# assistant-only loss needs them) and ends with the EOS token, so a trained model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{%- else -%}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)


def _pretrained_kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


# Put in front of a chat template that refuses a system message (Gemma's raises "System role not supported"): the
# system prompt becomes the start of the first user message, separated by a blank line.
SYSTEM_FOLD = (
    "{%- if messages and messages[0]['role'] == 'system' and messages | length > 1 "
    "and messages[1]['role'] == 'user' -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}]"
    " + messages[2:] -%}"
    "{%- endif -%}"
)

_PROBE = "Zq7 sentinel of the probe"


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer of the base (or of ``path``), ready for every stage (``fit_tokenizer``)."""
    from transformers import AutoTokenizer

    source = path or cfg.base
    try:
        tok = AutoTokenizer.from_pretrained(source, **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    return fit_tokenizer(tok, source)


def fit_tokenizer(tok, source: str = "the tokenizer"):
    """Make a tokenizer of any family usable by every stage, the same way each time (runs save the result, and
    loading it again changes nothing):

    - no chat template: ``FALLBACK_CHAT_TEMPLATE`` (GPT-2, OPT, GPT-NeoX and other base models);
    - a template that refuses a system message (Gemma): ``SYSTEM_FOLD`` in front of it;
    - the EOS token is the token that ends an assistant turn in the template, so that generation stops where a
      turn ends: Gemma ends turns with ``<end_of_turn>`` and a Llama 3 base tokenizer's EOS is
      ``<|end_of_text|>`` while its chat turns end with ``<|eot_id|>`` (as LLaMA-Factory's templates replace it);
    - no pad token: the old EOS when it was replaced, else the EOS (Llama 3, Mistral, GPT-2, GPT-NeoX). A reward
      is then read where transformers' sequence-classification models pool, the last token that is not pad
      (``reward_index``): the token before the final EOS.
    """
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if not _accepts_system(tok):
        tok.chat_template = SYSTEM_FOLD + tok.chat_template
    original_eos = tok.eos_token
    turn_end = assistant_turn_end(tok)
    if turn_end is not None and turn_end != tok.eos_token:
        tok.eos_token = turn_end
    if tok.eos_token is None:
        raise UserError(f"{source}: the tokenizer has no EOS token and its chat template ends no assistant turn "
                        "with a special token, so nothing could tell a response where to stop")
    if tok.pad_token is None:
        tok.pad_token = original_eos if original_eos and original_eos != tok.eos_token else tok.eos_token
    return tok


def _render(tok, messages: list[dict], **kwargs) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception, KeyError, ...)
        return None


def _accepts_system(tok) -> bool:
    return _render(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) is not None


def assistant_turn_end(tok) -> str | None:
    """The special token the chat template puts right after an assistant message's content, when that is not
    already the EOS token; None when the EOS closes the turn (or nothing can be told)."""
    text = _render(tok, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE}])
    if text is None or _PROBE not in text:
        return None
    ids = tok(text[text.rindex(_PROBE) + len(_PROBE):], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None and tok.eos_token_id in ids:
        return None
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return next((tok.convert_ids_to_tokens(i) for i in ids if i in special), None)


def load_config(cfg: ModelConfig):
    """The base's configuration alone (no weights), to check lengths before anything runs."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.base, **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.base}: cannot load the model configuration ({str(e).splitlines()[0]})") from None


def max_positions(config) -> int | None:
    """The longest sequence the model was built for: its position table (GPT-2, OPT: longer input crashes) or its
    trained context (rotary models run past it silently, out of distribution); None when the config has none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(config, limits: dict[str, int], where: str) -> None:
    """Each recipe length (``{"sft.max_length": 512}``; a key naming several, ``"a + b"``, is their sum) must fit
    the model's positions; an error naming the key otherwise."""
    positions = max_positions(config)
    for key, value in limits.items():
        if positions is not None and value > positions:
            raise UserError(f"{where}: {key} = {value} is longer than the model's {positions} positions "
                            f"(max_position_embeddings); lower it")


def accelerator() -> torch.device:
    """This process's device: its GPU when there is one (accelerate's), else the CPU."""
    from rlhf.scale import distributed

    return distributed.device()


def quantized(model) -> bool:
    """Whether bitsandbytes quantized ``model``'s weights (they cannot be moved after loading)."""
    core = unwrap(model)
    return bool(getattr(core, "is_loaded_in_4bit", False) or getattr(core, "is_loaded_in_8bit", False)
                or getattr(core, "is_quantized", False))


def place(model, device: torch.device | str | None):
    """``model`` on ``device``: every loader hands its model through here. None leaves it where it was loaded (for
    a trainer that places or shards it itself); a quantized model stays where bitsandbytes placed it when it was
    loaded (this process's GPU, ``load_base``)."""
    if device is None or quantized(model):
        return model
    return model.to(device)


def load_base(cfg: ModelConfig, kind: str = "causal", device: torch.device | str | None = None):
    """The base model as a causal LM (``kind="causal"``) or with a one-score head (``kind="score"``), on
    ``device`` (``place``; None: left where it loads, for a trainer to place)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {**_pretrained_kwargs(cfg), "dtype": torch_dtype(cfg.dtype), "use_safetensors": True}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization:
        kwargs["quantization_config"] = methods.quantization_config(cfg)
        if torch.cuda.is_available():  # a quantized model cannot move after loading: load it on this process's GPU
            kwargs["device_map"] = {"": accelerator()}
    try:
        if kind == "score":
            model = AutoModelForSequenceClassification.from_pretrained(cfg.base, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.base, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.base}: cannot load the base model ({str(e).splitlines()[0]})") from None
    if cfg.untrained_rows == "reinit":
        model.reinitialised_rows = reinit_untrained_rows(model, len(load_tokenizer(cfg)))
    return place(model, device)


def reinitialised(model) -> list[int]:
    """The embedding rows ``load_base`` re-initialised in ``model`` (for the log and the manifest); none with
    ``model.untrained_rows: keep``."""
    return list(getattr(model, "reinitialised_rows", []))


def untrained_note(rows: list[int], tokenizer) -> str | None:
    """What ``load_base`` did to the base's untrained ``rows`` (``reinitialised``), in words for a stage's log;
    None when nothing."""
    if not rows:
        return None
    named = ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens([i for i in rows if i < len(tokenizer)][:5]))
    return (f"{len(rows)} embedding rows of the base were never trained (e.g. {named}); set to the mean of the "
            "trained rows plus their spread (model.untrained_rows: keep leaves them)")


def untrained_rows(weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """The ids of the rows of an embedding matrix ``[rows, width]`` that training never moved, for a tokenizer of
    ``vocab`` ids: rows of (near) zero norm (a Llama 3 base's chat markers and reserved tokens), and, when the
    matrix is padded past the tokenizer, every row in the tight cluster those padding rows form (rows no tokenizer
    produces are untrained by construction; a base pretrained on narrow text leaves its unused tokens there too:
    the tiny base's chat markers and unused bytes). Randomly initialised rows form no cluster and are never taken."""
    w = weight.detach().float()
    norms = w.norm(dim=-1)
    typical = norms[:vocab].median()
    found = norms <= 1e-6 * typical
    if vocab < w.shape[0]:
        centre = w[vocab:].mean(0)
        distance = (w - centre).norm(dim=-1)
        spread = distance[vocab:].max()
        if spread < 0.25 * typical:
            found |= distance <= 2 * spread
    return found.nonzero()[:, 0]


def reinit_untrained_rows(model, vocab: int) -> list[int]:
    """Set the untrained rows (``untrained_rows``) of the input embedding, and of an untied output embedding, to
    the mean of the trained rows plus Gaussian noise of their per-dimension spread (a fixed seed: every load gives
    the same base). An adapter never trains these rows; left in place, a cluster of them shares one large logit at
    positions the base never saw: the tiny SFT policy put 18% of its first response token's probability on padding
    rows and scored the right first token at -3.6 nats (the floor is -1.07), -1.1 after this. Returns the ids."""
    done: list[int] = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point() or weight.dim() != 2 or (
                module is not model.get_input_embeddings() and weight is model.get_input_embeddings().weight):
            continue
        rows = untrained_rows(weight, vocab)
        if not len(rows) or len(rows) == weight.shape[0]:
            continue
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[rows] = False
        trained = weight.detach().float()[keep]
        noise = torch.randn(len(rows), weight.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            weight[rows] = (trained.mean(0) + noise.to(trained.device) * trained.std(0)).to(weight.dtype)
        done = sorted(set(done) | set(rows.tolist()))
    return done


def attach_adapter(model, cfg: AdapterConfig, task_type: str = "CAUSAL_LM", base: str | None = None,
                   total_steps: int = 0):
    """Make ``model`` trainable as ``cfg.method`` says (see ``rlhf.models.methods``)."""
    return methods.prepare(model, cfg, task_type, tokenizer_path=base, total_steps=total_steps)


def disable_dropout(model) -> int:
    """Turn every dropout in ``model`` off, as TRL's ``disable_dropout`` means to: the ``nn.Dropout`` modules (all
    TRL reaches) and the rates that families such as OPT keep as plain float attributes and pass to
    ``nn.functional.dropout`` (``dropout``, ``attention_dropout``, ``activation_dropout``, ``layerdrop``), which
    stay on in train mode otherwise: DPO's policy and reference passes would then differ on the same weights.
    The model's config is left as it is (a saved model keeps its family's rates). Returns how many rates it
    zeroed."""
    zeroed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            zeroed += module.p != 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float) and value != 0.0:
                setattr(module, name, 0.0)
                zeroed += 1
    return zeroed


def trainable_parameters(model) -> dict:
    """Trainable and total parameter counts, and the trainable percentage. peft's count is used for peft models:
    it counts a 4-bit weight's parameters, not the bytes it is packed into."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(total, 1), 4)}


@contextmanager
def loading(run_dir: str | Path, base: str):
    """Turn the libraries' errors for weights that do not fit (an adapter made for another base, a truncated or
    damaged safetensors file) into one-line errors naming the run directory."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (RuntimeError, ValueError, OSError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{run_dir}: its weights cannot be loaded onto base {base} ({first[:300]})") from None


def verify_weights(run_dir: str | Path) -> None:
    """Open every safetensors file of a run (headers and sizes are checked), so that a damaged file is reported
    before any work starts."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(run_dir).glob("*.safetensors")) + sorted(Path(run_dir).glob("value/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: damaged weights file ({str(e).splitlines()[0][:200]})") from None


def same_base(a: str, b: str) -> bool:
    """Whether two runs' ``base`` name one model: the same local directory (however spelt), or the same hub name."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


RUN_KINDS = {"policy": ("sft", "ppo", "dpo"), "reward model": ("rm",)}
"""what each kind of parent run may be: the stages whose output it is"""


def read_manifest(run_dir: str | Path, kind: str | None = None) -> dict:
    """A finished run directory's manifest (its weight files checked); a clear error for anything else,
    including a run of another ``kind`` than asked for ("policy" or "reward model", ``RUN_KINDS``)."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: damaged manifest ({e.msg})") from None
    if manifest.get("status") != "complete":
        raise UserError(f"{run_dir}: the run did not finish (status {manifest.get('status')!r})")
    if kind is not None and manifest.get("stage") not in RUN_KINDS[kind]:
        raise UserError(f"{run_dir}: is a {manifest.get('stage')!r} run, not a {kind} "
                        f"({' or '.join(RUN_KINDS[kind])})")
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    missing = [name for name in files if not (Path(run_dir) / name).is_file()]
    if missing:
        raise UserError(f"{run_dir}: {', '.join(missing)} missing (the run finished with it; was it moved or "
                        "deleted?)")
    verify_weights(run_dir)
    return manifest


@dataclass(frozen=True)
class ParentRun:
    """A finished run directory as a later stage reads it (``read_run``): what it is, what it trained on, how."""

    dir: Path
    stage: str
    """sft, rm, ppo, dpo or eval"""
    model: ModelConfig
    """the model settings it trained with, ``base`` being where its base is (the manifest's ``base``)"""
    method: str | None
    """the fine-tuning method (``adapter.method``; None for a run that trains nothing: eval)"""
    adapter: AdapterConfig
    """the recipe's adapter options it trained with"""
    recipe: dict
    """its whole resolved recipe, for a stage's own settings (``section("rm")["max_length"]``)"""
    reward_stats: dict | None
    """a reward model's score mean and std on its training data (None for other stages)"""
    parents: dict
    """its parents as it recorded them (``parent`` finds one, checked)"""
    manifest: dict
    """everything else the manifest holds"""

    def section(self, name: str) -> dict:
        """One section of the recipe the run trained with (``rm``, ``sft``, ...)."""
        return self.recipe.get(name) or {}

    def parent(self, role: str) -> Path | None:
        """Its parent run of ``role`` (``sft``, ``rm``): where it was recorded, checked to be the same run
        (``provenance.parent_of``); None when it has none."""
        from rlhf.runs import provenance

        return provenance.parent_of(self.manifest, self.dir, role)


def read_run(run_dir: str | Path, kind: str | None = None) -> ParentRun:
    """A finished run directory, typed (``read_manifest``'s checks: finished, weights intact, of ``kind``), its
    base where the run recorded it and checked to be the model it trained on (``provenance.base_of``; a hub id at
    the commit it recorded, unless its recipe names a revision)."""
    from rlhf.runs import provenance

    manifest = read_manifest(run_dir, kind)
    model = model_config_of(manifest, base=provenance.base_of(manifest, run_dir))
    model.revision = model.revision or provenance.revision_of(manifest)
    return ParentRun(dir=Path(run_dir), stage=manifest["stage"], model=model,
                     method=(manifest.get("adapter") or {}).get("method"),
                     adapter=AdapterConfig(**manifest["recipe"]["adapter"]), recipe=manifest["recipe"],
                     reward_stats=manifest.get("reward_stats"), parents=manifest.get("parents") or {},
                     manifest=manifest)


def find(spec: str, kind: str | None = None, what: str = "a model", prefix: str = "") -> ParentRun | str:
    """What a model spec a user gives names: a finished run directory of this project (``read_run``'s checks; of
    ``kind`` when given), or else a model directory or hub id, returned as given. The one parser for ``rm:``
    scorers and ``--reward`` (``rewards.load``) and ``judge:`` (``rlhf.feedback.judge``); a local path that does not
    exist is refused (``prefix`` and the spec, then what ``what`` may be)."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return read_run(spec, kind)
    if is_local(spec) and not path.exists():
        raise UserError(f"{prefix}{spec}: not found ({what} is a run directory, a model directory or a hub id)")
    return spec


def load_policy(run_dir: str | Path, model_cfg: ModelConfig | None = None,
                device: torch.device | str | None = None):
    """A causal LM from a finished SFT (or later PPO) run directory, and its tokenizer, on ``device`` (default:
    this process's accelerator).

    Adapter runs load their base (as recorded in the manifest, with the recorded model settings) and the adapter
    on top; full fine-tuning runs load the saved weights directly.
    """
    from transformers import AutoModelForCausalLM

    run = read_run(run_dir)
    cfg = model_cfg or run.model
    cfg.base = run.model.base
    tokenizer = load_tokenizer(cfg, str(run_dir))
    with loading(run_dir, cfg.base):
        model = methods.load(
            Path(run_dir), run.method, lambda: load_base(cfg),
            lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype), use_safetensors=True,
                                                              trust_remote_code=cfg.trust_remote_code))
    return place(model.eval(), device or accelerator()), tokenizer


def load_reward(run_dir: str | Path, model_cfg: ModelConfig | None = None,
                device: torch.device | str | None = None):
    """The reward model of a finished RM run directory (base + adapter + score head), and its tokenizer, on
    ``device`` (default: this process's accelerator)."""
    from transformers import AutoModelForSequenceClassification

    run = read_run(run_dir, "reward model")
    cfg = model_cfg or run.model
    cfg.base = run.model.base
    tokenizer = load_tokenizer(cfg, str(run_dir))

    def base():
        model = load_base(cfg, kind="score")
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    with loading(run_dir, cfg.base):
        model = methods.load(
            Path(run_dir), run.method, base,
            lambda path: AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(cfg.dtype),
                                                                            trust_remote_code=cfg.trust_remote_code,
                                                                            num_labels=1, use_safetensors=True))
    return place(model.eval(), device or accelerator()), tokenizer
