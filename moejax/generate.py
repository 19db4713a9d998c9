"""Autoregressive generation with a KV cache, for any model ``moejax.load`` opens (own runs and transformers
checkpoints alike):

    config, variables = moejax.load(path)
    tokens = moejax.generate.generate(config, variables, prompts, max_new_tokens=64)

One prefill pass writes the prompts into a preallocated cache of ``P + max_new_tokens`` slots per layer
(moejax/kv_cache.py: grouped-query keys and values, MLA's compressed latent, sliding windows with sinks), then a
jitted ``lax.while_loop`` decodes one token per step for the whole batch; nothing runs in Python per token. The loop
runs in chunks of steps (each about ``CHUNK_SECONDS`` long, sized from the previous one), so that Python's signal
handlers run between them: Ctrl-C raises KeyboardInterrupt within a chunk of decoding, and where the chunks end
changes no token. The MoE layers decode dropless whatever the training dispatch (a capacity would drop decode
tokens) and route as in evaluation (``train=False``: expert-choice routers route by token choice, which is causal).
Rows stop at ``eos_id``; the loop ends when every row has.

Sampling (greedy, temperature, top-k, top-p): moejax/sampling.py.

CLI (streams the text as it decodes, then prints the speed; Ctrl-C stops it, prints the speed of what was decoded
and exits with status 130; flags, errors and exit status as moejax/cli.py describes):

    python -m moejax.generate --checkpoint=<workdir | transformers dir> --prompt='def fibonacci(n):' \\
        --max_new_tokens=200 [--temperature=0.8 --top_p=0.95 --top_k=0 --seed=0]
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh

from moejax import checks, cli, kv_cache, model
from moejax.kv_cache import decode_config  # noqa: F401  (generate.decode_config, as before)
from moejax.quant import decode as quant_decode
from moejax.sampling import sample, sampling_problem

CHUNK_SECONDS = 0.1  # the decoding time between two chances for Ctrl-C (and other signals) to stop it


def _right_align(prompts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows prompts[b, :lengths[b]] moved to the right end (zeros before them)."""
    width = prompts.shape[1]
    cols = np.arange(width)[None, :]
    source = np.clip(cols - (width - lengths)[:, None], 0, width - 1)
    return np.where(cols >= (width - lengths)[:, None], np.take_along_axis(prompts, source, axis=1), 0)


def _prompt_lengths(prompts: np.ndarray, prompt_lengths: Any) -> np.ndarray:
    if prompt_lengths is None:
        return np.full((prompts.shape[0],), prompts.shape[1], np.int64)
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (prompts.shape[0],) or not np.issubdtype(lengths.dtype, np.integer) or \
            lengths.min() < 1 or lengths.max() > prompts.shape[1]:
        checks.fail("prompt_lengths", prompt_lengths, f"must be {prompts.shape[0]} integers (one per prompt row) in "
                                                      f"[1, {prompts.shape[1]}] (the prompts' width)")
    return lengths.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SelfContrast:
    """Self-contrast decoding (SCMoE, Shi et al., 2024, arXiv 2405.14507): every step runs the model twice, with its
    own top-k routing (strong) and with each MoE token routed to its ``rank``-th ranked expert alone (weak; the
    intervention ``rank_only``; 1 <= rank <= model.moe.num_experts, past top_k too: the authors' Mixtral example
    takes rank 3 with top-2), and decodes from ``(1 + beta) * z_strong - beta * z_weak`` on the plausible tokens
    ``z_strong >= log(alpha) + max z_strong`` (the others at -inf). Each routing keeps its own KV cache. beta = 0 is
    plain decoding. (On logits or log-probabilities alike: they differ by a per-row constant.) ``weight``: the weak
    expert's weight, 'score' (its router probability) or 'one'; None: the authors' choice for the model's router
    ('one' where it renormalises its selected weights, as Mixtral's; 'score' where it does not, as DeepSeekMoE's)."""

    rank: int = 2
    alpha: float = 0.1
    beta: float = 0.5
    weight: str | None = None

    def combine(self, strong: jax.Array, weak: jax.Array) -> jax.Array:
        strong, weak = strong.astype(jnp.float32), weak.astype(jnp.float32)
        plausible = strong >= jnp.log(jnp.float32(self.alpha)) + strong.max(axis=-1, keepdims=True)
        return jnp.where(plausible, (1 + self.beta) * strong - self.beta * weak, -jnp.inf)

    def check(self, cfg: ml_collections.ConfigDict) -> None:
        from moejax.moe import intervention as iv_lib

        checks.positive_int("contrast.rank", self.rank)
        ranked, allowed = iv_lib.max_rank(cfg)
        if self.rank > ranked:
            checks.fail("contrast.rank", self.rank, f"must be <= {allowed}")
        if self.weight is not None:
            checks.choice("contrast.weight", self.weight, list(iv_lib.RANK_WEIGHTS))
        if not 0.0 < self.alpha <= 1.0:
            checks.fail("contrast.alpha", self.alpha, "must be in (0, 1]")
        checks.number("contrast.beta", self.beta)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What a compiled loop is specialised on (besides the config and the mesh)."""

    rows: int
    width: int
    new: int
    temperature: float
    top_k: int
    top_p: float
    eos_id: int | None
    stream: Callable | None
    contrast: SelfContrast | None
    intervention: Any  # the static part of the intervention record (its treedef), or None


def generate(config: ml_collections.ConfigDict, variables: dict[str, Any], prompts: Any, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
             eos_id: int | None = None, prompt_lengths: Any = None, mesh: Mesh | None = None,
             stream: Callable[[np.ndarray], None] | None = None, intervention: Any = None,
             contrast: SelfContrast | None = None, quantise: str | None = None) -> np.ndarray:
    """prompts [B, P] int -> tokens [B, P + max_new_tokens] int32.

    Without ``prompt_lengths`` every row is a full prompt of P tokens: the output row is the prompt, then the new
    tokens. Ragged batches pass ``prompt_lengths`` [B]: row b's prompt is prompts[b, :len_b] (what follows in the
    row is ignored) and the output row is that prompt, its max_new_tokens new tokens, then padding. Inside, the
    rows are right-aligned and the padding before them is masked, so each row gets exactly what it gets alone.
    A row that emits ``eos_id`` continues with eos_id; padding is eos_id, or 0 without one. ``rng`` (a jax key)
    is needed when temperature > 0. ``mesh``: decode with the MoE layers expert-parallel on this mesh (the batch
    is padded to a multiple of its token shards). ``stream`` is called on the host with each step's new tokens
    [B'] (B' >= B rows: padding rows last) as they are decoded, in order. ``intervention``: a routing
    intervention record (moejax/moe/intervention.py) applied to every forward pass. ``contrast``: self-contrast
    decoding (``SelfContrast``; its weak routing also carries the intervention). ``quantise``: weight-only
    quantised decoding ('int8', 'int4', 'int4/g32', ...: moejax/quant/decode.py), the weights held as int codes and
    scales and dequantised inside each step; variables may also hold them already (``quant.decode.quantise``).
    """
    cfg = decode_config(config)
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer) or prompts.shape[1] < 1:
        checks.fail("prompts", f"array of shape {prompts.shape} and dtype {prompts.dtype}",
                    "must be a [batch, prompt_length] integer array with prompt_length >= 1")
    if prompts.min() < 0 or prompts.max() >= cfg.vocab_size:
        checks.fail("prompts", f"ids in [{prompts.min()}, {prompts.max()}]",
                    f"must be token ids in [0, model.vocab_size={cfg.vocab_size})")
    problem = sampling_problem(max_new_tokens, temperature, top_k, top_p, cfg.vocab_size)
    if problem:
        checks.fail(*problem)
    if temperature > 0 and rng is None:
        checks.fail("rng", None, "sampling (temperature > 0) needs a jax.random key")
    strong, weak = _routings(cfg, intervention, contrast)
    if quantise is not None:
        variables = quant_decode.prepare(config, variables, quantise, mesh)
    lengths = _prompt_lengths(prompts, prompt_lengths)
    batch, width = prompts.shape
    aligned = _right_align(prompts, lengths)
    rows = batch
    if mesh is not None:  # the MoE layers split the tokens over the mesh's token axes
        from moejax.parallel import TOKEN_AXES
        shards = int(np.prod([mesh.shape[a] for a in TOKEN_AXES if a in mesh.shape]))
        rows = -(-batch // shards) * shards
        aligned = np.concatenate([aligned, np.repeat(aligned[:1], rows - batch, axis=0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[:1], rows - batch)])
    settings = _Settings(rows, width, max_new_tokens, float(temperature), int(top_k), float(top_p), eos_id, stream,
                         contrast, jax.tree.structure((strong, weak)))
    prefill, decode = _compiled(cfg, mesh, settings)
    params = {k: v for k, v in variables.items() if k != kv_cache.COLLECTION}
    start = jnp.asarray(width - lengths, jnp.int32)
    with _CtrlC() as ctrl_c:
        state = prefill(params, jnp.asarray(aligned, jnp.int32), start, jax.random.key(0) if rng is None else rng,
                        strong, weak)
        chunk, done = 1, 1
        while done < max_new_tokens and not np.asarray(state[3]).all():  # state: (steps done, tokens, caches,
            ctrl_c.check()                                                 # rows finished, rng)
            began = time.perf_counter()
            state = decode(params, state, start, strong, weak, jnp.int32(min(done + chunk, max_new_tokens)))
            done = int(state[0])  # waits for the chunk
            chunk = max(1, min(2 * chunk, int(chunk * CHUNK_SECONDS / max(time.perf_counter() - began, 1e-9))))
    out = np.array(state[1])[:batch]
    out[:, width + done:] = 0 if eos_id is None else eos_id  # every row stopped early
    if prompt_lengths is None:
        return out
    pad = 0 if eos_id is None else eos_id
    shift = (width - lengths[:batch])[:, None]
    cols = np.arange(out.shape[1])[None, :]
    moved = np.take_along_axis(out, np.minimum(cols + shift, out.shape[1] - 1), axis=1)
    return np.where(cols + shift < out.shape[1], moved, pad).astype(np.int32)


class _CtrlC:
    """Within the block, on the main thread while SIGINT has Python's default handler: a first Ctrl-C is only
    recorded, and ``check`` raises it as KeyboardInterrupt between two chunks of decoding (on CPU a stream callback
    runs on the thread that dispatched the chunk, where an exception would break the computation); a second Ctrl-C
    raises at once."""

    def __init__(self) -> None:
        self.pressed = self.installed = False

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


def _routings(cfg: ml_collections.ConfigDict, intervention: Any, contrast: SelfContrast | None) -> tuple[Any, Any]:
    """(the intervention of the model's own routing, that of the weak routing or None)."""
    from moejax.moe import intervention as iv_lib

    if intervention is not None:
        intervention.check(cfg)
    if contrast is None:
        return intervention, None
    contrast.check(cfg)
    weak = iv_lib.rank_only(cfg, contrast.rank, weight=contrast.weight)
    return intervention, weak if intervention is None else intervention.merge(weak)


_RUNNERS: dict[tuple, Any] = {}  # the compiled loops, by config, mesh and settings
_MAX_RUNNERS = 16


def _compiled(cfg: ml_collections.ConfigDict, mesh: Mesh | None, settings: _Settings) -> tuple[Callable, Callable]:
    """The jitted prefill and decode loop for one config, mesh and settings (reused across calls)."""
    key = (cfg.to_json(), mesh, settings)
    if key not in _RUNNERS:
        if len(_RUNNERS) >= _MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS)))
        _RUNNERS[key] = _build(cfg, mesh, settings)
    return _RUNNERS[key]


def _build(cfg: ml_collections.ConfigDict, mesh: Mesh | None, s: _Settings) -> tuple[Callable, Callable]:
    """(prefill, decode). prefill(variables, prompts, start, rng, strong, weak) reads the right-aligned prompts
    (the first start[b] slots of row b are padding) and samples the first new token; decode(variables, state, start,
    strong, weak, until) runs decode steps until ``until`` new tokens are out or every row has stopped. Both give
    the loop state (new tokens so far, the token buffer [B, P + new], the caches, the rows finished, the rng);
    decode consumes the state it is given."""
    module = model.Transformer(cfg, mesh)
    length = s.width + s.new
    eos = -1 if s.eos_id is None else s.eos_id  # -1: no token ever equals it

    def emit(tokens: jax.Array) -> None:
        if s.stream is not None:
            io_callback(lambda t: s.stream(np.asarray(t)), None, tokens, ordered=True)

    def stepper(variables, start, strong, weak):
        def forward(cache_vars, tokens, index, routing):
            cache = kv_cache.Cache(length, jnp.asarray(index, jnp.int32), start)
            extra = {} if routing is None else {"intervention": routing}
            weights = quant_decode.materialise(variables, routed=False)  # int codes dequantised in the step;
            #                                     the routed experts' only for the experts the step selects
            logits, mutated = module.apply({**weights, **cache_vars}, tokens, cache=cache,
                                           mutable=[kv_cache.COLLECTION], **extra)
            return logits[:, -1], mutated

        def step(caches, tokens, index, key):
            """The next tokens [B] and the caches after reading tokens [B, S] at slot index."""
            logits, strong_cache = forward(caches[0], tokens, index, strong)
            if s.contrast is None:
                return sample(logits, key, s.temperature, s.top_k, s.top_p), (strong_cache,)
            weak_logits, weak_cache = forward(caches[1], tokens, index, weak)
            return (sample(s.contrast.combine(logits, weak_logits), key, s.temperature, s.top_k, s.top_p),
                    (strong_cache, weak_cache))

        return step

    def prefill(variables, prompts, start, rng, strong, weak):
        rng, key = jax.random.split(rng)
        first, caches = stepper(variables, start, strong, weak)(({}, {}), prompts, 0, key)
        emit(first)
        buf = jnp.zeros((s.rows, length), jnp.int32).at[:, :s.width].set(prompts).at[:, s.width].set(first)
        return jnp.int32(1), buf, caches, first == eos, rng

    def decode(variables, state, start, strong, weak, until):
        step = stepper(variables, start, strong, weak)

        def cond(state):
            done_steps, _, _, finished, _ = state
            return (done_steps < until) & ~jnp.all(finished)

        def body(state):
            done_steps, buf, caches, finished, rng = state
            pos = s.width + done_steps - 1
            rng, key = jax.random.split(rng)
            token, caches = step(caches, jax.lax.dynamic_slice_in_dim(buf, pos, 1, axis=1), pos, key)
            token = jnp.where(finished, eos, token)
            emit(token)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, token[:, None], pos + 1, axis=1)
            return done_steps + 1, buf, caches, finished | (token == eos), rng

        return jax.lax.while_loop(cond, body, state)

    return jax.jit(prefill), jax.jit(decode, donate_argnums=1)


# ----------------------------------------------------------------------------------------------- CLI


def parser() -> cli.ArgumentParser:
    """The CLI's flags."""
    parser = cli.ArgumentParser(prog="python -m moejax.generate", description="Generate text from a moejax workdir or "
                                "a transformers checkpoint directory, streaming it as it decodes.")
    cli.add_checkpoint_flags(parser)
    parser.add_argument("--prompt", default="", help="the text to continue (empty: the start of a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=200,
                        help="new tokens at most (fewer when the model ends the document)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; else sample from softmax(logits / temperature)")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the top_k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="sample from the most likely tokens that reach this probability (1: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument("--quantise", default="none", help="weight-only quantised decoding: int8, int4, int4/g<G> "
                                                           "(int codes dequantised inside each step), or none")
    parser.add_argument("--draft", default=None, help="speculative decoding with this smaller model as the "
                                                      "draft: a moejax workdir or transformers directory")
    parser.add_argument("--speculative", default=None, choices=["mtp"],
                        help="mtp: self-speculative decoding, the model's multi-token-prediction module drafting")
    parser.add_argument("--gamma", type=int, default=4, help="--draft / --speculative: tokens proposed per round")
    return parser


def _parse(argv: list[str]) -> Any:
    args = parser().parse_args(argv)
    _check_flags(args)
    return args


def _check_flags(args: Any, vocab: int | None = None) -> None:
    """UsageError naming the first sampling flag generate cannot run with (top_k against vocab when given)."""
    problem = sampling_problem(args.max_new_tokens, args.temperature, args.top_k, args.top_p, vocab)
    if problem:
        raise cli.flag_error(*problem)
    quant_decode.check_flag(args)


def _trained_length(opened: cli.Checkpoint) -> tuple[int, str] | None:
    """(tokens, where that number comes from): the sequence length the model was trained on, when known (a
    workdir's train.seq_len, a transformers config.json's max_position_embeddings)."""
    if opened.is_workdir:
        return opened.config.train.seq_len, "its train.seq_len"
    length = json.loads((opened.path / "config.json").read_text()).get("max_position_embeddings")
    return (int(length), "max_position_embeddings in its config.json") if isinstance(length, int) else None


class _Printer:
    """Prints the text of the tokens decoded so far as it grows (holding back an incomplete UTF-8 character); stops
    printing, quietly, when the reader of the output has closed it."""

    def __init__(self, tokenizer: Any, out: Any) -> None:
        self.tokenizer, self.out, self.ids, self.shown, self.stopped = tokenizer, out, [], "", False
        self.steps = 0
        self.marks: list[float] = []  # when the first two steps' tokens arrived: after the prefill and after the
        #                               decode loop's compilation

    def __call__(self, tokens: np.ndarray) -> None:
        self.steps += 1
        if len(self.marks) < 2:
            self.marks.append(time.perf_counter())
        token = int(tokens[0])
        if self.stopped or token == self.tokenizer.eos_id:
            self.stopped = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if self.out is not None and text.startswith(self.shown) and not text.endswith("\ufffd"):
            try:
                self.out.write(text[len(self.shown):])
                self.out.flush()
            except BrokenPipeError:
                cli.quiet_stdout()
                self.out = None
            self.shown = text

    def statistics(self, started: float, loaded: float) -> str:
        """The new tokens and the time of each stage, from started (before loading) and loaded (after); the decoding
        speed counts the steps after the second (the first ones include the compilations)."""
        now = time.perf_counter()
        begin = self.marks[-1] if self.marks else now
        new = len(self.ids) + self.stopped
        return (f"{new} new tokens; loading {loaded - started:.1f} s, prefill and compile {begin - loaded:.1f} s, "
                f"decoding {now - begin:.2f} s = {(self.steps - len(self.marks)) / max(now - begin, 1e-9):.1f} "
                f"tokens/s")


def main(argv: list[str] | None = None) -> np.ndarray:
    """``python -m moejax.generate`` with argv (default sys.argv[1:]): the tokens [1, P + max_new_tokens]. Ctrl-C
    raises KeyboardInterrupt whose message holds the statistics of what was decoded."""
    from moejax.data import tokenizers

    args = _parse(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    opened = cli.open_checkpoint(args)
    config = opened.config
    _check_flags(args, config.model.vocab_size)
    tokenizer = tokenizers.for_checkpoint(opened.path, config)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]  # an empty prompt starts a new document
    trained = _trained_length(opened)
    if trained and len(ids) + args.max_new_tokens > trained[0]:
        cli.warn(f"--max_new_tokens={args.max_new_tokens} after a prompt of {len(ids)} tokens runs to "
                 f"{len(ids) + args.max_new_tokens} tokens, past the {trained[0]} the model was trained on "
                 f"({trained[1]}); the text may degrade beyond them")
    if args.draft is not None or args.speculative is not None:
        from moejax import speculative

        return speculative.command(args, config, opened.variables, ids, tokenizer)
    loaded = time.perf_counter()
    printer = _Printer(tokenizer, sys.stdout)
    sys.stdout.write(args.prompt)
    try:
        tokens = generate(config, opened.variables, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          rng=jax.random.key(args.seed), eos_id=tokenizer.eos_id, stream=printer,
                          quantise=None if args.quantise == "none" else args.quantise)
    except KeyboardInterrupt:
        print()
        raise KeyboardInterrupt(f"stopped by Ctrl-C: {printer.statistics(started, loaded)}") from None
    print(f"\n\n[{printer.statistics(started, loaded)}]", file=sys.stderr)
    return tokens


if __name__ == "__main__":
    cli.run(main)
