"""Early-exit BiLD (the paper's RQ4): one model is both decoders. The small model is the first `exit_layer`
decoder layers followed by an exit head; the large model is the whole stack.

    from decode import BiLDConfig, EarlyExitBiLD
    bild = EarlyExitBiLD(model, exit_layer=2, config=BiLDConfig(fallback_threshold=0.5, rollback_threshold=3.0))
    bild = EarlyExitBiLD("runs/latest/exit_frozen/final")   # a trained exit head, saved with its model
    out = bild.generate(input_ids, max_new_tokens=64); out.sequences, out.stats

Nothing is computed twice. Layers 1..k keep one KV cache for both roles, and every small step also keeps
its layer-k hidden state (a static buffer indexed by position). A fallback pass runs only layers k+1..L,
over the positions the large model has not seen, from those hidden states; a position no small step has
fed yet (after the step cap, or the last token before the end) goes through layers 1..k first, in the
same pass. Layer 1 thus sees each position once, plus the positions a rollback re-feeds. The encoder of an
encoder-decoder model runs once per input. The policies (fallback, both rollback modes, the step cap) are
BiLD's own loop; with rollback="exact" the output is the model's own greedy output.

The exit head: without training, the model's own final norm and LM head over layer k's states, so any
covered model works out of the box. `align/train.py objective=early_exit` trains an `ExitHead` (a residual
MLP adapter, zero at initialisation, and a copy of the final norm; the LM head stays shared) and saves it with
the checkpoint (`exit_head.safetensors`, `exit_head.json`).

The passes are decode/fast.py's compact decoders, so early exit covers the same families (BART, Marian,
T5/mT5, Llama, Qwen2, Mistral); on CUDA they run as CUDA graphs, elsewhere without.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from decode.bild import BiLD, BiLDConfig
from decode.loading import load_model, warn_on_processors
from decode.cache import first_cut
from decode.families import decoder_layers, final_norm_module, output_logits, unsupported_reason
from decode.fast import MAX_GRAPH_TOKENS, FastRunner, notice
from decode.generation import RowDecoder
from decode.graphs import PassGraphs

EXIT_HEAD_WEIGHTS = "exit_head.safetensors"
EXIT_HEAD_CONFIG = "exit_head.json"


def decoder_depth(model: PreTrainedModel) -> int:
    """The number of decoder layers, as the compact decoder counts them (T5's may differ from its encoder's)."""
    return decoder_layers(model)


def check_exit_layer(model: PreTrainedModel, exit_layer) -> int:
    """The exit layer as an int in [1, L - 1], or a ValueError that says what is allowed."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"early exit runs on the compact decoder passes of decode/fast.py, which do not cover "
                         f"{type(model).__name__}: {reason}")
    depth = decoder_depth(model)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < depth:
        raise ValueError(f"exit_layer must be an integer from 1 to {depth - 1}: {type(model).__name__} has {depth} "
                         f"decoder layers, and exiting after all of them leaves no large model (got {exit_layer!r})")
    return exit_layer


class ExitHead(nn.Module):
    """Layer k's states -> logits: h + adapter(h) (a two-layer MLP of width 2d whose output is zero at
    initialisation), this head's copy of the final norm (None where the family has none), then the model's own
    LM head (not owned here).

    Untrained it equals the model's own head, so a freshly made ExitHead and no ExitHead decode the same.
    """

    def __init__(self, model: PreTrainedModel, exit_layer: int):
        super().__init__()
        self.exit_layer = check_exit_layer(model, exit_layer)
        d = model.config.get_text_config(decoder=True).hidden_size
        param = next(model.parameters())
        kw = dict(device=param.device, dtype=param.dtype)
        self.adapter = nn.Sequential(nn.Linear(d, 2 * d, **kw), nn.GELU(), nn.Linear(2 * d, d, **kw))
        nn.init.zeros_(self.adapter[-1].weight)  # zero output at initialisation: the model's own head
        nn.init.zeros_(self.adapter[-1].bias)
        final_norm = final_norm_module(model)
        self.norm = copy.deepcopy(final_norm) if final_norm is not None else None
        if self.norm is not None:
            self.norm.requires_grad_(True)

    def logits(self, model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
        """h: layer k's states [B, n, d] -> logits [B, n, V] through the model's own LM head."""
        return output_logits(model, h + self.adapter(h), self.norm)

    def save(self, folder: str | Path, state_dict: dict | None = None, **info) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / EXIT_HEAD_WEIGHTS))
        (folder / EXIT_HEAD_CONFIG).write_text(json.dumps({"exit_layer": self.exit_layer, **info}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, model: PreTrainedModel) -> "ExitHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        info = json.loads((folder / EXIT_HEAD_CONFIG).read_text())
        head = cls(model, int(info["exit_layer"]))
        param = next(model.parameters())
        state = {k: v.to(param.device, param.dtype) for k, v in load_file(str(folder / EXIT_HEAD_WEIGHTS)).items()}
        head.load_state_dict(state)
        head.info = info
        return head.eval()


def find_exit_head(folder) -> dict | None:
    """The exit_head.json of a local checkpoint folder, or None."""
    path = Path(str(folder)) / EXIT_HEAD_CONFIG if folder else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


class EarlyExitRunner(FastRunner):
    """One model split at `exit_layer`. BiLD drives it through two views (`_SmallView`: layers 1..k and the
    exit head; `_LargeView`: layers k+1..L), which point at the runner and not back. `length` counts the
    positions layers 1..k hold, `high_length` those layers k+1..L hold; high_length <= length always."""

    def __init__(self, model: PreTrainedModel, exit_layer: int, exit_head: ExitHead | None = None, graphs: bool = True,
                 compile: bool | None = None):
        super().__init__(model, compile)
        self.exit_layer = check_exit_layer(model, exit_layer)
        self.exit_head = exit_head
        self._width = model.config.get_text_config(decoder=True).hidden_size
        self.use_graphs = self.use_graphs and graphs
        if not self.use_graphs:
            self.graphs = PassGraphs(self.device, enabled=False)
        depth = self.decoder.n_layers
        self.path = (f"early exit after layer {exit_layer} of {depth}, fast (static cache, "
                     + ("CUDA graphs" if self.use_graphs else "no graphs") + (", compiled)" if self.compiled else ")"))
        self.high_length = 0
        self._hpos0 = torch.zeros(1, dtype=torch.long, device=self.device)  # position of the upper pass's first token
        self._hpos_on_device: int | None = None
        self._hidden = None  # [capacity, d]: layer k's output at every position a small step fed

    # -- the verbs, through the views --------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt: list[int], max_new_tokens: int) -> None:
        self.high_length = 0
        super().start(prompt, max_new_tokens)  # the encoder, or the prompt prefill through every layer

    @torch.inference_mode()
    def small_step(self, tokens: list[int]) -> tuple[float, int]:
        """Layers 1..k and the exit head over `tokens` at positions length..; (confidence, argmax) of the next."""
        n = len(tokens)
        key = ("exit_step", n)
        if key in self.graphs:
            self._load(tokens)
            self._run(key)
            confidence, token = self._step_out.tolist()  # note: the one host-device sync per step
        else:
            ids = torch.tensor(tokens, device=self.device)
            confidence, token = self._step_core(ids, self.length + torch.arange(n, device=self.device))
            confidence, token = torch.stack([confidence, token.float()]).tolist()  # note: sync point
            self._forget_device_state()
        token = int(token)
        self.length += n
        if key in self.graphs:
            self._pos_on_device, self._ids_on_device = self.length, (token,)
        return confidence, token

    @torch.inference_mode()
    def large_check(self, tokens: list[int], n_pending: int, rollback: str, threshold: float) -> tuple[int, list[int]]:
        """Layers k+1..L over `tokens` (positions high_length..), after layers 1..k over those of them that no
        small step fed; returns the first cut (n_pending when none) and the argmax at every position."""
        n = len(tokens)
        m = self.high_length + n - self.length  # trailing tokens that layers 1..k have not seen
        if not 0 <= m <= n:
            raise RuntimeError(f"early exit: {n} tokens from position {self.high_length}, but layers 1..k hold "
                               f"{self.length}")
        if n != n_pending + 1:
            raise ValueError(f"early exit checks the last checked token and {n_pending} pending ones; got {n} tokens")
        key = ("exit_check", n, m, rollback)
        if key in self.graphs:
            self._load(tokens)
            if self._hpos_on_device != self.high_length:
                self._hpos0.fill_(self.high_length)
            if rollback == "ce" and self._threshold_value != float(threshold):
                self._threshold.fill_(threshold)
                self._threshold_value = float(threshold)
            self._run(key)
            values = self._check_out[: n + 1].tolist()  # note: the one host-device sync per large call
            self._pos_on_device = self._hpos_on_device = self.high_length + n
        else:
            ids = torch.tensor(tokens, device=self.device)
            cut, argmax = self._check_core(ids, m, self.length, self.high_length, rollback, threshold)
            values = torch.cat([cut.view(1), argmax]).tolist()  # note: sync point
            self._forget_device_state()
        self.length = self.high_length = self.high_length + n
        return values[0], values[1:]

    def rewind(self, length: int) -> None:
        self.length = min(self.length, length)
        self.high_length = min(self.high_length, length)

    # -- the passes ---------------------------------------------------------------------------------

    def _lower(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Embedding and layers 1..k over ids at pos ([m]); keeps layer k's states by position. -> [1, m, d]"""
        h = self.decoder.run_layers(self.decoder.embed(ids[None], pos[None]), pos[None], 0, self.exit_layer)
        self._hidden.index_copy_(0, pos, h[0])
        return h

    def _exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.exit_head is None:
            return self.decoder.head(h)[0]  # the model's own final norm and LM head
        return self.exit_head.logits(self.passes.model_ref(), h)[0]

    def _step_core(self, ids, pos):
        h = self._lower(ids, pos)
        confidence, token = self.decoder.verdict(self._exit_logits(h[:, -1:])[None])  # [1] each
        return confidence[0], token[0]

    def _check_core(self, ids, m: int, low0, high0, rollback, threshold):
        """ids: [n], the tokens at positions high0..; the last m of them start at low0 and need layers 1..k."""
        n = ids.shape[0]
        if m:
            self._lower(ids[n - m :], low0 + torch.arange(m, device=self.device))
        pos = high0 + torch.arange(n, device=self.device)
        h = self.decoder.run_layers(self._hidden[pos][None], pos[None], self.exit_layer, self.decoder.n_layers)
        logits = self.decoder.head(h)[0].float()  # [n, V]
        argmax = logits.argmax(dim=-1)
        return first_cut(logits[:-1], argmax[:-1], ids[1:], rollback, threshold), argmax

    def _pass(self, key: tuple):
        if key[0] == "exit_step":
            n = key[1]

            def exit_step():
                confidence, token = self._step_core(self._ids[:n], self._pos0 + self._arange[:n])
                self._step_out[0] = confidence
                self._step_out[1] = token
                self._ids[0] = token  # the next step's input stays on the device
                self._pos0 += n

            return exit_step
        if key[0] == "exit_check":
            _, n, m, rollback = key

            def exit_check():
                cut, argmax = self._check_core(self._ids[:n], m, self._pos0, self._hpos0, rollback, self._threshold)
                self._check_out[0] = cut
                self._check_out[1 : n + 1] = argmax
                self._hpos0 += n
                self._pos0.copy_(self._hpos0)

            return exit_check
        return super()._pass(key)

    # -- buffers and bookkeeping ---------------------------------------------------------------------

    def plan_role(self, role: str, keys) -> None:
        """Translates BiLD's plan (("step", n), ("check", n, rollback)) into this runner's passes."""
        mapped = []
        for key in keys:
            if key[0] == "step" and role == "small":
                mapped.append(("exit_step", key[1]))
            elif key[0] == "check" and role == "large":
                mapped += [("exit_check", key[1], m, key[2]) for m in (0, 1)]
        self._wanted.update(k for k in mapped if k[1] <= MAX_GRAPH_TOKENS)

    def _ensure_capacity(self, length: int, src_length: int) -> None:
        capacity = self.capacity
        super()._ensure_capacity(length, src_length)
        if self._hidden is None or capacity != self.capacity:
            self._hidden = torch.zeros(self.capacity, self._width, dtype=self.dtype, device=self.device)

    def _eager_catch_up(self, tokens: list[int]) -> None:
        """The decoder-only prompt prefill: every layer, both lengths (nothing reads its exit states)."""
        super()._eager_catch_up(tokens)
        self.high_length = self.length

    def _prefill(self, tokens: list[int], bucket: int | None) -> None:
        super()._prefill(tokens, bucket)
        self.high_length = self.length

    def _zero_positions(self) -> None:
        super()._zero_positions()
        self._hpos0.zero_()

    def _forget_device_state(self) -> None:
        super()._forget_device_state()
        self._hpos_on_device = None


class _SmallView:
    """The small model of early-exit BiLD: layers 1..k and the exit head."""

    def __init__(self, runner: EarlyExitRunner):
        self.runner = runner

    @property
    def path(self):
        return self.runner.path

    @property
    def length(self) -> int:
        return self.runner.length

    def plan(self, keys) -> None:
        self.runner.plan_role("small", keys)

    def step(self, tokens):
        return self.runner.small_step(tokens)

    def rewind(self, length: int) -> None:
        self.runner.rewind(length)


class _LargeView(_SmallView):
    """The large model of early-exit BiLD: layers k+1..L (and 1..k for positions no small step fed)."""

    @property
    def length(self) -> int:
        return self.runner.high_length

    def plan(self, keys) -> None:
        self.runner.plan_role("large", keys)

    def check(self, tokens, n_pending, rollback, threshold):
        return self.runner.large_check(tokens, n_pending, rollback, threshold)


class EarlyExitBiLD(BiLD):
    """BiLD over one model (the paper's early exit): the small decoder is its first `exit_layer` decoder layers and
    an exit head, the large one the whole stack; no partner model. The same `generate` contract and `.stats` as BiLD.

    model: a loaded model, or a Hub name or folder (loaded with `load_kwargs`: dtype, device, ...).
    exit_head: "auto" (a trained head saved in the model's folder, else the model's own final norm and LM
    head), None (always the model's own), a folder, or an ExitHead.
    """

    def __init__(self, model, exit_layer: int | None = None, config: BiLDConfig | None = None, exit_head="auto",
                 **load_kwargs):
        folder = None
        if isinstance(model, (str, Path)):
            folder = str(model)
            model = load_model(folder, **load_kwargs)
        elif load_kwargs:
            raise TypeError(f"loading arguments {sorted(load_kwargs)} need a model name or folder, not a loaded model")
        if exit_layer is not None:
            check_exit_layer(model, exit_layer)  # before anything is loaded or allocated
        if isinstance(exit_head, str) and exit_head == "auto":  # a trained head saved with the checkpoint
            folder = folder or getattr(model, "name_or_path", None)
            info = find_exit_head(folder)
            if info is not None and exit_layer is not None and int(info["exit_layer"]) != exit_layer:
                raise ValueError(f"{folder} holds an exit head trained for exit_layer {info['exit_layer']}, not "
                                 f"{exit_layer}; pass exit_head=None for the untrained exit at that layer")
            exit_head = folder if info is not None else None
        if isinstance(exit_head, (str, Path)):
            if find_exit_head(exit_head) is None:
                raise FileNotFoundError(f"no {EXIT_HEAD_CONFIG} in {exit_head}")
            exit_head = ExitHead.load(exit_head, model)
        if exit_head is not None:
            if exit_layer is None:
                exit_layer = exit_head.exit_layer
            elif exit_layer != exit_head.exit_layer:
                raise ValueError(f"the exit head was trained for exit_layer {exit_head.exit_layer}, not {exit_layer}")
        if exit_layer is None:
            raise ValueError("exit_layer is needed when no trained exit head is given")
        check_exit_layer(model, exit_layer)

        RowDecoder.__init__(self, model)  # output layout and special tokens (BiLD's own __init__ takes two models)
        warn_on_processors(model)
        self.large = self.small = model.eval()
        self.config = config if config is not None else BiLDConfig()
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.runner = EarlyExitRunner(model, exit_layer, exit_head, graphs=self.config.fast_path is not False and on_cuda,
                                      compile=self.config.compile)
        self._large, self._small = _LargeView(self.runner), _SmallView(self.runner)
        self.exit_layer, self.exit_head = exit_layer, exit_head
        self._plan()
        self.path = self.runner.path
        trained = "trained" if exit_head is not None else "untrained (the model's own final norm and LM head)"
        notice(f"early-exit BiLD: {type(model).__name__} exits after decoder layer {exit_layer} of "
               f"{self.runner.decoder.n_layers}; exit head {trained}")

    def _check_sampling(self) -> None:
        raise ValueError("early-exit BiLD decodes greedy only; sampling is available for two-model BiLD")

    def _start_row(self, prompt: list[int], max_new_tokens: int) -> None:
        self.runner.start(prompt, max_new_tokens)  # one model, one start: the encoder runs once
