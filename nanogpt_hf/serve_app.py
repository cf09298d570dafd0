"""nanogpt-serve's endpoint: transformers' own server (`transformers serve`: its FastAPI app, its model process, its
streaming) with its /v1/completions handler extended by the OpenAI fields clients send and it leaves out, instead
of a server written beside it:

- `logprobs` (the top ones at each token, at most 5 as OpenAI allows) and `echo` (the prompt's tokens and their
  log-probabilities before the completion's): the model's log_softmax, computed in the model's process. This is
  what lm-evaluation-harness's `local-completions` scores loglikelihood tasks with.
- a list of prompts (strings or token ids) and `n` choices each, indexed in that order;
- `stop` trimmed from the text, as OpenAI does (transformers stops there but keeps it), streamed or not;
- a missing or empty prompt, characters outside a char model's vocabulary, a lone surrogate, token ids outside the
  vocabulary, and fields it cannot honour (`best_of`, `presence_penalty`): a 400 that names the field.
The model answers to the run's folder name (and the path given to nanogpt-serve) as well as to its served folder.
A chat request to a model without a chat template is a 400 that says to use /v1/completions.
"""

import json
import time

import torch
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.completion_choice import Logprobs
from transformers.cli.serve import Serve
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler

from .tokenization import char_vocabulary, encode_text

__all__ = ["NanoGPTServe", "token_logprobs", "trim_at_stop"]

MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions' `logprobs`
MAX_CHOICES = 16  # prompts x n in one request: each is a generation of its own


@torch.no_grad()
def token_logprobs(model, processor, ids, top):
    """Runs in the model's process (EngineClient.submit): for each token of ids after the first, its log-probability
    given those before it (log_softmax of the model's logits) and the `top` most likely (id, log-probability) pairs
    there, as lists."""
    x = torch.tensor([ids], device=model.device)
    logprobs = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)  # (T-1, vocab)
    chosen = logprobs.gather(1, x[0, 1:, None])[:, 0]
    best = logprobs.topk(top, dim=-1) if top else None
    return chosen.tolist(), ([] if best is None else list(zip(best.indices.tolist(), best.values.tolist())))


def trim_at_stop(text, stops):
    """(text cut before the first stop string it holds, whether one was found): what OpenAI's API returns."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _bad(field, why):
    return HTTPException(status_code=400, detail=f"{field}: {why}")


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise _bad("stop", "a non-empty string or a list of up to 4 of them")
    return stops


def _count(body, field, default, low, high):
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(field, f"an integer from {low} to {high}, got {value!r}")
    return value


class _Pinned:
    """The model as requests may name it: its served folder, the run's folder name, the path given."""

    def _named(self, body):
        if body.get("model") in self.names:
            body = {**body, "model": self.model_manager.force_model}
        return body


class NanoGPTCompletionHandler(_Pinned, CompletionHandler):
    _unused_fields = {"user"}

    def __init__(self, *args, names=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.names = set(names)

    async def handle_request(self, body, request_id):
        self._validate_request(body)
        body = self._named(body)
        for field, neutral in (("best_of", 1), ("presence_penalty", 0)):
            if body.get(field) not in (None, neutral):
                raise _bad(field, f"not supported by this server (send {neutral} or leave it out)")
        n = _count(body, "n", 1, 1, MAX_CHOICES)
        top = _count(body, "logprobs", None, 0, MAX_LOGPROBS)
        echo, stops = bool(body.get("echo")), _stops(body)
        max_tokens = _count(body, "max_tokens", None, 0, 1 << 20)
        engine = self.model_manager.get_engine(body.get("model"))
        tokenizer = getattr(engine.processor, "tokenizer", engine.processor)
        prompts = [self._ids(p, tokenizer, engine.model_config.vocab_size) for p in self._prompts(body)]
        if len(prompts) * n > MAX_CHOICES:
            raise _bad("n", f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} completions in one request")
        kwargs = self._build_generation_kwargs(body, engine.generation_config)  # stops there; trimmed here
        if body.get("stream"):
            if len(prompts) > 1 or n > 1 or echo or top is not None:
                field = next(f for f, on in (("prompt", len(prompts) > 1), ("n", n > 1), ("echo", echo),
                                             ("logprobs", top is not None)) if on)
                raise _bad(field, "not supported with stream=true: send it without streaming")
            inputs = _inputs(prompts[0])
            self._check_prompt_length(engine, inputs)
            return self._streaming(request_id, engine, inputs, kwargs, body.get("suffix"), body.get("stream_options"),
                                   stops)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for ids in prompts:
            inputs = _inputs(ids)
            self._check_prompt_length(engine, inputs)
            prompt_tokens += len(ids)
            for j in range(n):
                seeded = {**kwargs, "seed": kwargs["seed"] + j} if kwargs.get("seed") is not None and j else kwargs
                choice, generated = await self._choice(engine, tokenizer, ids, seeded, max_tokens, stops, echo, top,
                                                       body.get("suffix"))
                choices.append(CompletionChoice.model_construct(index=len(choices), **choice))
                completion_tokens += generated
        usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)
        result = Completion.model_construct(id=request_id, created=int(time.time()), model=engine.model_id, choices=choices,
                            object="text_completion", usage=usage)
        return JSONResponse(result.model_dump(exclude_none=True), media_type="application/json")

    async def _choice(self, engine, tokenizer, ids, kwargs, max_tokens, stops, echo, top, suffix):
        """One choice's fields and its number of generated tokens."""
        generated = []
        if max_tokens != 0:
            _, _, generated = await engine.generate_non_streaming(_inputs(ids), kwargs)
        count = len(generated)  # usage counts what was generated, the stop string's tokens too
        text, stopped = trim_at_stop(tokenizer.decode(generated, skip_special_tokens=True), stops)
        if stopped:  # the tokens behind the text returned (their log-probabilities too)
            while generated and len(tokenizer.decode(generated, skip_special_tokens=True)) > len(text):
                generated = generated[:-1]
        finish = "stop" if stopped else self._get_finish_reason(kwargs, len(generated))
        shown = [*ids, *generated] if echo else generated
        logprobs = None
        if top is not None and shown:
            logprobs = await self._logprobs(engine, tokenizer, ids, generated, echo, top)
        text = (tokenizer.decode(ids) if echo else "") + text + (suffix or "")
        return {"text": text, "logprobs": logprobs, "finish_reason": finish}, count

    async def _logprobs(self, engine, tokenizer, ids, generated, echo, top):
        """OpenAI's logprobs of the tokens returned: the prompt's too with echo (its first token has none)."""
        sequence = [*ids, *generated]
        chosen, best = await engine.submit(token_logprobs, sequence, top)
        start = 0 if echo else len(ids)
        values = [None, *chosen][start:]
        tops = [None, *({tokenizer.decode([i]): v for i, v in pairs} for pairs in _rows(best, top))][start:]
        tokens = [tokenizer.decode([i]) for i in sequence[start:]]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        # constructed, not validated: OpenAI's first echoed token has no log-probability (null), which its types lack
        return Logprobs.model_construct(tokens=tokens, token_logprobs=values, top_logprobs=tops if top else None,
                                        text_offset=offsets)

    @staticmethod
    def _prompts(body):
        prompt = body.get("prompt")
        if prompt is None:
            raise _bad("prompt", "missing: send the text to complete (a string, a list of strings, or token ids)")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("prompt", "a string, a list of strings, a list of token ids, or a list of such lists")
        return prompt

    @staticmethod
    def _ids(prompt, tokenizer, vocab_size):
        if isinstance(prompt, list):
            if not prompt or not all(_is_id(t) for t in prompt):
                raise _bad("prompt", "a list of token ids must hold at least one, each an integer")
            outside = [t for t in prompt if not 0 <= t < vocab_size]
            if outside:
                raise _bad("prompt", f"token ids {outside[:5]} are outside the vocabulary (0 to {vocab_size - 1})")
            return prompt
        if not isinstance(prompt, str):
            raise _bad("prompt", f"each prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise _bad("prompt", "empty: a completion continues at least one character")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad("prompt", f"not valid Unicode ({e.reason} at character {e.start})") from e
        if char_vocabulary(tokenizer) is None:
            return tokenizer(prompt).input_ids
        try:
            return encode_text(tokenizer, prompt)
        except ValueError as e:
            raise _bad("prompt", f"{e}: send text made of its characters") from e

    def _streaming(self, request_id, engine, inputs, kwargs, suffix=None, stream_options=None, stops=()):
        """transformers' stream, with OpenAI's stop trimming: text that could begin a stop string is held back
        until it cannot, and the stream ends before the stop string."""
        response = super()._streaming(request_id, engine, inputs, kwargs, suffix, stream_options)
        if not stops:
            return response
        return _trimmed_stream(response, stops, lambda text: self._build_chunk_sse(request_id, engine.model_id, text=text),
                               self._build_chunk_sse(request_id, engine.model_id, finish_reason="stop"))


def _trimmed_stream(response, stops, chunk, finished):
    """response's events with the text cut before the first stop string (chunk(text) makes a text event, finished
    the last one)."""
    longest = max(map(len, stops))
    source = response.body_iterator

    async def events():
        held = ""
        try:
            async for part in source:
                for event in part.split("\n\n"):
                    if not event.startswith("data: "):
                        continue
                    data = json.loads(event[len("data: "):]) if event != "data: [DONE]" else None
                    choices = (data or {}).get("choices") or []
                    if not choices or choices[0].get("finish_reason"):  # the end: what is held goes out
                        if held:
                            yield chunk(held)
                            held = ""
                        yield event + "\n\n"
                        continue
                    held, stopped = trim_at_stop(held + choices[0].get("text", ""), stops)
                    if stopped:
                        if held:
                            yield chunk(held)
                        yield finished
                        return
                    ready, held = held[:max(0, len(held) - longest + 1)], held[max(0, len(held) - longest + 1):]
                    if ready:
                        yield chunk(ready)
        finally:
            await source.aclose()

    response.body_iterator = events()
    return response


class NanoGPTChatHandler(_Pinned, ChatCompletionHandler):
    def __init__(self, *args, names=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.names = set(names)

    async def handle_request(self, body, request_id):
        body = self._named(body)
        engine = self.model_manager.get_engine(body.get("model"))
        tokenizer = getattr(engine.processor, "tokenizer", engine.processor)
        if not getattr(tokenizer, "chat_template", None):
            raise _bad("messages", "this is a base model with no chat template: send a prompt to /v1/completions")
        return await super().handle_request(body, request_id)


def _rows(best, top):
    """token_logprobs' flat (ids, values) pairs per position back in rows of `top`."""
    for ids, values in best:
        yield list(zip(ids, values))


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _inputs(ids):
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


class NanoGPTServe(Serve):
    """`transformers serve FOLDER --trust-remote-code` with this module's handlers: the same model manager, the same
    app (transformers' build_server) and uvicorn settings (transformers.cli.serve.Serve.run)."""

    def __init__(self, folder, names, listening, **options):
        self.names, self.listening = names, listening  # listening: the socket bound before the model loaded
        super().__init__(folder, trust_remote_code=True, **options)

    def run(self, socket=None, engine_connection=None):
        import gc

        import uvicorn
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.response import ResponseHandler
        from transformers.cli.serving.server import build_server
        from transformers.cli.serving.systemone import SystemOneHandler
        from transformers.cli.serving.transcription import TranscriptionHandler
        from transformers.cli.serving.utils import freeze_garbage_collector, set_serve_log_level

        set_serve_log_level(self.log_level, self.enable_log_requests)
        manager = ModelManager(self.loader, self.generation_state, model_timeout=self.model_timeout,
                               force_model=self.force_model, engine_connection=engine_connection)
        common = dict(model_manager=manager, generation_state=self.generation_state)
        templated = dict(common, chat_template_kwargs=self.chat_template_kwargs)
        app = build_server(
            manager, NanoGPTChatHandler(**templated, names=self.names),
            completion_handler=NanoGPTCompletionHandler(**common, names=self.names),
            response_handler=ResponseHandler(**templated), transcription_handler=TranscriptionHandler(manager),
            systemone_handler=SystemOneHandler(**templated, decision_config=self.decision_config),
            enable_cors=self.enable_cors)

        async def stop_if_an_engine_died():
            if manager.is_dead:
                server.should_exit = True

        server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="info",
                                               callback_notify=stop_if_an_engine_died, timeout_notify=5))
        freeze_garbage_collector()
        server.run(sockets=[socket or self.listening])
        gc.unfreeze()
        if manager.is_dead:
            raise RuntimeError("the model's process died (see the error above): the server stopped")
