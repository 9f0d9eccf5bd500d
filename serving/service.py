"""BentoML services: image classification, house prices, poem generation, and all of them at once.

Each kind is a mixin of typed ``@bentoml.api`` methods; ``ImageService``, ``PriceService`` and
``PoemService`` serve one kind each (``bentoml serve serving.service:PoemService``) so they scale
independently, and ``DlbookService`` serves all three from one process for local use, with no
inter-service hop. Models come from the BentoML store (see ``serving.model_store``), inputs are
prepared by the same code and metadata training used, and every refusal is a 4xx whose message
says what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import bentoml
import msgspec
import numpy as np
from starlette.responses import Response, StreamingResponse

from preprocessing import RecordError
from serving import direct_routes
from serving.artifacts import ArtifactError
from serving.batching import MicroBatcher
from serving.config import service_options
from serving.direct_routes import DirectRoute
from serving.errors import ApiError, quiet_client_errors
from serving.guard import stand_in_front
from serving.house_pricing import HousePricer
from serving.image_classification import ImageModel
from serving.image_to_tensor import (
    ImageInputError,
    ImageLimits,
    array_to_frame,
    decode_image,
    is_small_image,
    to_dataset_frame,
)
from serving.metrics import REQUESTS, batch_observer, poem_step_observer
from serving.model_store import ExportedModel, ModelNotFound, exported_names, load_exported, locate_exported
from serving.playground import playground_app
from serving.poem_engine import DecoderStopped
from serving.poem_generation import PoemGenerator
from serving.poem_sampling import PoemRequestError
from serving.request_models import PoemRequest
from serving.routes import ROUTES, api
from serving.settings import Settings, current

logger = logging.getLogger("dlbook.serving")


class _Base:
    """Model loading that never crashes the worker: failures make ``/readyz`` say why instead."""

    limits: Settings  # the worker's settings (serving.settings): request limits, batching, models
    load_errors: list[str]
    loaded: dict[str, ExportedModel]

    def _start(self) -> None:
        self.limits = current()  # read once per process, shared with the request guard
        logging.getLogger("dlbook").setLevel(self.limits.log_level)  # after BentoML configured logging
        quiet_client_errors()
        self.load_errors = []
        self.loaded = {}

    def _direct_routes(self) -> dict[str, DirectRoute]:
        """The hot routes this service answers from its request guard (see :mod:`serving.direct_routes`):
        every ``fast`` route of the table (``serving.routes``) whose handler this service has, called
        undecorated (the guard answers its refusals)."""
        routes = {}
        for route in ROUTES:
            method = getattr(type(self), route.handler, None)
            if not route.fast or method is None:
                continue
            answer = (getattr(self, route.fast_handler) if route.fast_handler
                      else functools.partial(inspect.unwrap(method.func), self))
            routes[route.path] = DirectRoute.for_route(route, method.input_spec, answer)
        return routes

    def _settle(self) -> None:
        """Install the direct routes, then move what start-up loaded out of the collector's sight.

        ``gc.freeze``: imported modules, models and vocabularies leave ~90,000 long-lived objects that every full
        collection walked: 20-30 ms each on our 2-core machine, landing in the p99 of whichever
        request was running. Frozen, a full collection skips them (measured: under 0.1 ms).
        """
        if self.limits.direct_routes:  # DLBOOK_DIRECT_ROUTES=0: everything through BentoML
            direct_routes.install(self._direct_routes())
        gc.collect()
        gc.freeze()

    def _load_task(self, task: str, load: Callable[..., ExportedModel] = load_exported) -> dict[str, ExportedModel]:
        names = self.limits.models_for(task) or exported_names(task)
        if not names:
            self.load_errors.append(f"no exported {task} model in the BentoML store; run "
                                    "`python -m training export all` (or ./dlbook up)")
        models = {}
        for name in names:
            try:
                models[name] = load(name, settings=self.limits)
            except (ModelNotFound, ArtifactError, bentoml.exceptions.BentoMLException) as err:
                self.load_errors.append(f"{name}: {err}")
                logger.error("cannot load %s: %s", name, err)
        self.loaded.update(models)
        return models

    def _build(self, models: dict[str, ExportedModel], build: Any) -> dict[str, Any]:
        """``build(model)`` for each model; one that fails is reported by /readyz, not fatal to the worker."""
        built = {}
        for name, model in models.items():
            try:
                built[name] = build(model)
            except Exception as err:  # noqa: BLE001 - any failure here must leave the worker up
                self.load_errors.append(f"{name}: cannot start ({type(err).__name__}: {err})")
                self.loaded.pop(name, None)  # /models lists what is served
                logger.exception("cannot start %s", name)
        return built

    def _pick(self, task: str, available: dict[str, Any], requested: str, fallback: str) -> tuple[str, Any]:
        if not available:
            raise ApiError(f"no {task} model is loaded: {'; '.join(self.load_errors)}", 503)
        name = requested or self.limits.default_model(task, fallback)
        if name not in available:
            if requested:
                raise ApiError(f"unknown model {requested!r}; available: {', '.join(sorted(available))}", 404)
            name = sorted(available)[0]
        return name, available[name]

    def __is_ready__(self) -> bool:
        return not self.load_errors

    @api
    def models(self) -> dict[str, Any]:
        """The loaded models: name, version, runtime provider, input/output spec, training metrics."""
        return {"models": [m.describe() for m in self.loaded.values()], "problems": self.load_errors}


class ImageAPIs(_Base):
    def _init_images(self) -> None:
        self.image_models = self._build(self._load_task("image"), ImageModel)
        self.image_batchers = {
            n: MicroBatcher(m.probabilities, self.limits.max_batch, batch_observer(n, m.model.provider),
                            self.limits.inline_rows)
            for n, m in self.image_models.items()
        }
        self.image_limits = ImageLimits()

    def _pick_image_model(self, model: str) -> tuple[str, ImageModel]:
        return self._pick("image", self.image_models, model, "fashion-lenet")

    async def _classify(self, endpoint: str, name: str, image_model: ImageModel, frames: list[np.ndarray],
                        top_k: int, return_frame: bool) -> dict[str, Any]:
        REQUESTS.labels(endpoint, name).inc()
        probs = await self.image_batchers[name].submit(np.stack(frames))
        predictions = []
        for frame, p in zip(frames, probs, strict=True):
            answer = image_model.describe(p, top_k)
            if return_frame:
                answer["frame"] = frame.tolist()
            predictions.append(answer)
        return {"model": name, "version": image_model.model.tag.split(":")[1], "predictions": predictions}

    def _check_image_request(self, count: int, top_k: int) -> None:
        if count == 0:
            raise ApiError("no image received: send one or more files in the multipart field 'images'")
        if count > self.limits.max_images:
            raise ApiError(f"{count} images in one request; the limit is {self.limits.max_images} "
                           "(DLBOOK_MAX_IMAGES): split them over several requests", 413)
        if not 1 <= top_k <= 10:
            raise ApiError(f"top_k must lie between 1 and 10, got {top_k}")

    @api
    async def classify(self, images: list[Path], model: str = "", top_k: int = 3,
                       return_frame: bool = False) -> dict[str, Any]:
        """Classify uploaded images (PNG, JPEG, GIF, BMP, WebP, TIFF; any size): label, probability, top-k.

        Photos are made dataset-like first: grayscale, inverted when the background is light,
        cropped to the content and fitted into the 28×28 frame the model was trained on.
        """
        return await self.classify_uploads([path.read_bytes() for path in images], model, top_k, return_frame)

    async def classify_uploads(self, images: list[bytes], model: str = "", top_k: int = 3,
                               return_frame: bool = False) -> Response:
        """``/classify`` on the uploaded files' bytes (the direct route hands them over from memory)."""
        self._check_image_request(len(images), top_k)
        name, image_model = self._pick_image_model(model)
        frames = []
        for i, data in enumerate(images):
            try:
                if is_small_image(data):  # a thread hop costs more than decoding a small image
                    gray = decode_image(data, self.image_limits)
                else:
                    gray = await asyncio.to_thread(decode_image, data, self.image_limits)
                frames.append(to_dataset_frame(gray, image_model.dataset))
            except ImageInputError as err:
                raise ApiError(f"image {i + 1}: {err.message}", err.status) from err
        return answer(await self._classify("classify", name, image_model, frames, top_k, return_frame))

    @api
    async def classify_pixels(self, images: list[Any], model: str = "", top_k: int = 3) -> dict[str, Any]:
        """Classify 28×28 arrays (0–255, or 0–1 floats), light on dark as in the data sets."""
        self._check_image_request(len(images), top_k)
        name, image_model = self._pick_image_model(model)
        frames = []
        for i, pixels in enumerate(images):
            try:
                frames.append(array_to_frame(pixels))
            except ImageInputError as err:
                raise ApiError(f"image {i + 1}: {err.message}", err.status) from err
        return answer(await self._classify("classify_pixels", name, image_model, frames, top_k, False))


class PriceAPIs(_Base):
    def _init_prices(self) -> None:
        self.pricers = self._build(self._load_task("price"), HousePricer)
        self.price_batchers = {
            n: MicroBatcher(p.predict, self.limits.max_batch, batch_observer(n, p.model.provider),
                            self.limits.inline_rows)
            for n, p in self.pricers.items()
        }

    @api
    async def predict_price(self, records: list[Any], model: str = "") -> dict[str, Any]:
        """Sale price in dollars per house record (Kaggle column names), with an 80% price range.

        A column left out is *unknown*: it is filled in as the nearest training houses have it, and
        the answer lists it under ``imputed``. A column sent as null or "NA" keeps the data set's
        meaning ("none": no garage, no alley…). ``price_ranges[i]`` is ``[low, high]``: calibrated so
        that ``range_coverage`` (0.8) of houses sell inside it; it widens as fewer columns are given.
        """
        name, pricer = self._pick("price", self.pricers, model, "house-price")
        if not records:
            raise ApiError("records is empty: send a list of objects with Kaggle House Prices columns")
        if len(records) > self.limits.max_records:
            raise ApiError(f"{len(records)} records in one request; the limit is {self.limits.max_records} "
                           "(DLBOOK_MAX_RECORDS): send them in several requests", 413)
        try:
            completions = pricer.encode(records)
        except RecordError as err:
            raise ApiError(str(err), 422) from err
        REQUESTS.labels("predict_price", name).inc()
        priced = pricer.prices(completions, await self.price_batchers[name].submit(completions.rows))
        bad = [i for i, p in enumerate(priced.prices) if not np.isfinite(p)]
        if bad:
            raise ApiError(f"records {bad[:10]} give no finite price: their values are far outside anything "
                           "in the training data; check units and magnitudes", 422)
        body: dict[str, Any] = {"model": name, "version": pricer.model.tag.split(":")[1],
                                "prices": [round(float(p), 2) for p in priced.prices]}
        if priced.ranges is not None:
            body["price_ranges"] = np.round(priced.ranges, 2).tolist()
            body["range_coverage"] = priced.coverage
        body["imputed"] = priced.imputed
        return answer(body)


class PoemAPIs(_Base):
    def _init_poems(self) -> None:
        # located, not loaded: only each model's decoding process opens a session on its graph
        self.poem_generators = self._build(
            self._load_task("poem", locate_exported),
            lambda m: PoemGenerator(m, self.limits.max_poem_batch, functools.partial(poem_step_observer, m.name)))

    def _poem_request(self, request: PoemRequest) -> tuple[str, PoemGenerator, list]:
        """The model and one sampler per poem for a validated request (``serving.request_models``);
        what is left to refuse depends on the model (a character it never saw, rhyme or tones it cannot
        keep: 422)."""
        name, generator = self._pick("poem", self.poem_generators, request.model, "tang-poem")
        try:
            samplers = generator.samplers(request)
        except PoemRequestError as err:
            raise ApiError(str(err), 422) from err
        REQUESTS.labels("generate_poem", name).inc()
        return name, generator, samplers

    @api
    async def generate_poem(self, request: PoemRequest, /) -> dict[str, Any]:
        """Write ``n`` poems of exactly the asked form (5 or 7 characters a line, 4 or 8 lines).

        ``prompt`` starts the poem, ``acrostic`` gives each line's first character, ``theme`` (free
        Chinese text) seeds lines with its keywords. The same ``seed`` and parameters give the same poem.
        ``rhyme`` (off, auto or a 平水韵 group) and ``tones`` (off, loose, strict) constrain the sound;
        each poem's ``prosody`` reports its rhyme group and each line's tone marks (平 仄 中 ？).
        """
        try:
            name, generator, samplers = self._poem_request(request)
            deadline = asyncio.get_running_loop().time() + self.limits.generation_timeout_s
            poems = await asyncio.gather(*[generator.generate(s, deadline) for s in samplers])
            return answer({"model": name, "version": generator.model.tag.split(":")[1], "poems": poems})
        except TimeoutError as err:
            raise ApiError("generation took longer than DLBOOK_GENERATION_TIMEOUT_S; ask for fewer poems or try "
                           "again when the server is less busy", 503) from err
        except DecoderStopped as err:
            raise ApiError("the poem decoding process stopped while writing this poem; it restarts on its own: "
                           "try again", 503) from err

    @api
    async def generate_poem_stream(self, request: PoemRequest, /) -> dict[str, Any]:
        """The same poems as ``/generate_poem``, streamed as Server-Sent Events while they are written.

        Events: ``token`` (``{"index", "char"}``) per character, then ``done`` with the whole poems,
        or ``error`` with a message if generation fails midway.
        """
        name, generator, samplers = self._poem_request(request)
        version = generator.model.tag.split(":")[1]
        return StreamingResponse(self._sse(name, version, generator, samplers), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, name: str, version: str, generator: PoemGenerator, samplers: list) -> AsyncIterator[str]:
        """Token events as the poems are written, then ``done`` (or ``error``).

        One poem (the usual request) is relayed straight from the engine. Several are merged through
        one queue by a pump task each. Events go out in writes at most every ``stream_flush_ms``
        (``DLBOOK_STREAM_FLUSH_MS``; the first at once, the last as soon as the poem ends): a write per
        character costs a trip through every middleware's ``send``, a socket write and a wake-up of
        the client, which at sixteen streams was a third of the machine, while 20 ms is far below what
        a reader notices. The engine paces the characters it hands over, so the writer also wakes up
        once per write rather than once per character.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.generation_timeout_s
        flush_s = self.limits.stream_flush_ms / 1e3
        pending: list[str] = []
        tasks: list[asyncio.Task] = []
        try:
            if len(samplers) == 1:
                # aclosing: when this stream is closed (the client went away), the poem leaves the
                # decoding batch at once, not when the engine's generator is collected
                async with contextlib.aclosing(generator.stream(samplers[0], deadline, flush_s)) as written:
                    async for chars in written:
                        yield "".join([_token_event(0, ch) for ch in chars])
            else:
                queue: asyncio.Queue = asyncio.Queue()

                async def pump(index: int, sampler) -> None:
                    try:
                        async with contextlib.aclosing(generator.stream(sampler, deadline, flush_s)) as written:
                            async for chars in written:
                                queue.put_nowait((index, chars))
                    except Exception as err:  # noqa: BLE001 - handed to the writer, which reports it
                        queue.put_nowait((index, err))
                    finally:
                        queue.put_nowait((index, None))

                tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(samplers)]
                running = len(tasks)
                last_write = -float("inf")
                while running:
                    items = [await queue.get()]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    for index, item in items:
                        if item is None:
                            running -= 1
                        elif isinstance(item, BaseException):
                            raise item
                        else:
                            pending.extend(_token_event(index, ch) for ch in item)
                    if pending and loop.time() - last_write >= flush_s:
                        yield "".join(pending)
                        pending.clear()
                        last_write = loop.time()
            if pending:
                yield "".join(pending)
            poems = [generator.report(s) for s in samplers]
            yield _event("done", {"model": name, "version": version, "poems": poems})
        except TimeoutError:
            late = "generation took longer than DLBOOK_GENERATION_TIMEOUT_S"
            yield "".join(pending) + _event("error", {"error": late})
        except Exception as err:  # noqa: BLE001 - the client must hear about it, not see a silent end
            logger.exception("poem stream failed")
            yield "".join(pending) + _event("error", {"error": f"generation failed ({type(err).__name__})"})
        finally:
            for task in tasks:
                task.cancel()


_JSON = msgspec.json.Encoder()


def answer(payload: dict[str, Any]) -> Response:
    """A success body as a ready response: BentoML then skips its generic output path, which builds
    a pydantic JSON schema for every response (a tenth of the worker's time in the profile).

    Encoded by msgspec, not Starlette's ``JSONResponse`` (``json.dumps``): 1.2 µs against 6.3 µs for a
    one-image answer, on the event loop of every request. Same JSON (UTF-8, compact); a float is
    written in its shortest exact form, not always as ``repr`` would (``0.000012345`` for ``1.2345e-05``).
    """
    return Response(_JSON.encode(payload), media_type="application/json")


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@functools.lru_cache(maxsize=1 << 16)
def _token_event(index: int, char: str) -> str:
    """A ``token`` event; kept, since a stream sends one per character from a vocabulary of thousands."""
    return _event("token", {"index": index, "char": char})


_OPTIONS = service_options(current())


# The playground at /ui shows only the panels whose models /models lists.
@bentoml.asgi_app(playground_app, path="/ui")
@bentoml.service(name="dlbook-image", **_OPTIONS)
class ImageService(ImageAPIs):
    def __init__(self) -> None:
        self._start()
        self._init_images()
        self._settle()


@bentoml.asgi_app(playground_app, path="/ui")
@bentoml.service(name="dlbook-price", **_OPTIONS)
class PriceService(PriceAPIs):
    def __init__(self) -> None:
        self._start()
        self._init_prices()
        self._settle()


@bentoml.asgi_app(playground_app, path="/ui")
@bentoml.service(name="dlbook-poem", **_OPTIONS)
class PoemService(PoemAPIs):
    def __init__(self) -> None:
        self._start()
        self._init_poems()
        self._settle()


@bentoml.asgi_app(playground_app, path="/ui")
@bentoml.service(name="dlbook", **_OPTIONS)
class DlbookService(ImageAPIs, PriceAPIs, PoemAPIs):
    """All three kinds in one process, for local use (``./dlbook up``)."""

    def __init__(self) -> None:
        self._start()
        self._init_images()
        self._init_prices()
        self._init_poems()
        self._settle()


for _service in (ImageService, PriceService, PoemService, DlbookService):
    stand_in_front(_service)

__all__ = ["DlbookService", "ImageService", "PoemService", "PriceService"]
