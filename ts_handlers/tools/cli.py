"""``ts-handlers``: build, serve, query and scaffold archives from one command.

    ts-handlers init path/to/checkpoint --name reviews      # -> archiver_configs/reviews/
    ts-handlers init distilbert/distilbert-base-uncased-finetuned-sst-2-english  # a Hub id
    ts-handlers import old.mar --name reviews                # TorchServe example's archive
    ts-handlers build archiver_configs/reviews              # -> model_store/reviews.mar
    ts-handlers serve reviews.mar                           # until Ctrl-C
    ts-handlers predict reviews --text "a thin plot, carried by its cast"
    ts-handlers predict mnist --file digit.png --url http://127.0.0.1:8080 --key key_file.json
    ts-handlers predict sentiment_eager --text "loved it" --explain --html explain.html
    ts-handlers predict reranker --query "news about Unilever" --text "..." "..."   # rerank
    ts-handlers kserve kserve_out mnist sentiment          # -> what KServe mounts + manifest

``build`` runs ``ts_handlers.tools.build``; ``serve`` and ``predict`` start a
``LocalTorchServe`` with its safe defaults (loopback only, token authorization on, model API
off); ``init`` writes the config folder the build reads, for a model folder or file as it is;
``kserve`` writes the folder KServe's TorchServe runtime mounts (docs/kserve.md).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ts_handlers.config import SETUP_CONFIG_FILE, ConfigError, read_json_object

DEFAULT_MODEL_STORE = Path("model_store")
DEFAULT_CONFIGS_ROOT = Path("archiver_configs")
ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MODEL_CONFIG_TEXT = """\
# TorchServe worker and batching settings. Requests arriving within maxBatchDelay ms of each
# other reach the handler as one batch.
minWorkers: 1
maxWorkers: 1
batchSize: 8
maxBatchDelay: 20
# Seconds one batch may take before TorchServe restarts the worker.
responseTimeout: 60
"""


class CommandError(Exception):
    """A mistake the user can fix; printed without a traceback, exit status 1."""


# ---- build -----------------------------------------------------------------------------------


def run_build(build_args: Sequence[str]) -> int:
    """``python -m ts_handlers.tools.build`` itself: the same options, stages and exit codes."""
    from ts_handlers.tools import build

    return build.main(list(build_args))


# ---- serve -----------------------------------------------------------------------------------


def resolve_archives(archives: Sequence[str], model_store: Path | None) -> tuple[Path, list[str]]:
    """(model store, archive file names in it) for archive names or paths.

    TorchServe loads archives from one store only (``allowed_urls`` admits nothing else), so a
    path names its own store when ``--model-store`` is not given, and must lie in it when it is.
    """
    given_store = model_store
    names: list[str] = []
    for archive in archives:
        path = Path(archive)
        is_path = path.suffix == ".mar" and (path.is_file() or len(path.parts) > 1)
        if is_path:
            store = path.resolve().parent
            if model_store is None:
                model_store = store
            elif store != model_store.resolve():
                where = "--model-store" if given_store is not None else "the first archive's"
                raise CommandError(
                    f"{archive} is not in {model_store} ({where} folder); TorchServe serves "
                    "archives from one model store: move it there or pass --model-store"
                )
            names.append(path.name)
        else:
            names.append(archive if archive.endswith(".mar") else f"{archive}.mar")
    store = (model_store or DEFAULT_MODEL_STORE).resolve()
    if not store.is_dir():
        raise CommandError(f"model store {store} does not exist")
    for name in names:
        if not (store / name).is_file():
            found = ", ".join(sorted(p.name for p in store.glob("*.mar"))) or "none"
            raise CommandError(f"{name} is not in {store} (archives there: {found})")
    return store, names


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt, so the server is stopped either way.

    SIGINT is set too because a shell starts background commands with it ignored, and Python
    then never turns it into KeyboardInterrupt: ``kill -INT`` would do nothing.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def run_serve(args: argparse.Namespace) -> int:
    from ts_handlers.tools.server import KEY_FILE, LocalTorchServe, TorchServeStartError

    store, names = resolve_archives(args.archives, args.model_store)
    _stop_on_signals()
    server = LocalTorchServe(store, names, enable_model_api=args.enable_model_api)
    print(
        f"starting TorchServe on {', '.join(names) or 'no archives'} from {store} ...", flush=True
    )
    try:
        try:
            server.start()
        except TorchServeStartError as error:
            print(start_error(error), file=sys.stderr)
            return 1
        assert server.workdir is not None
        key_file = server.workdir / KEY_FILE
        print(f"inference:  {server.inference_url}")
        print(f"management: {server.management_url}")
        print(f"metrics:    {server.metrics_url}")
        print(f"key file:   {key_file}")
        for name in names:
            print(f"model:      {server.inference_url}/predictions/{Path(name).stem}")
        first = Path(names[0]).stem if names else "<model>"
        print(
            f"try: ts-handlers predict {first} --text ... --url {server.inference_url} "
            f"--key {key_file}"
        )
        print("serving; Ctrl-C stops the server", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        print("TorchServe exited on its own", file=sys.stderr)
        print(server.log_tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping TorchServe ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the stop short and leave TorchServe running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()
        print("stopped", flush=True)


# ---- predict ---------------------------------------------------------------------------------


def request_body(
    texts: Sequence[str] | None, file: Path | None, query: str | None = None
) -> tuple[Any, str | None]:
    """(body, content type) for the inference API; ``None`` lets the client choose it. With
    ``query``, the texts are reranked against it (a cross-encoder archive: docs/reranking.md)."""
    if query is not None:
        if not texts:
            raise CommandError("--query reranks the texts given with --text; name some")
        return {"query": query, "texts": list(texts), "return_text": True}, "application/json"
    if texts:
        return {"inputs": texts[0] if len(texts) == 1 else list(texts)}, "application/json"
    assert file is not None
    if not file.is_file():
        raise CommandError(f"{file} is not a file")
    if file.suffix.lower() == ".txt":
        return {"inputs": file.read_text(encoding="utf-8").strip()}, "application/json"
    if file.suffix.lower() == ".json":
        return file.read_bytes(), "application/json"
    content_type, _ = mimetypes.guess_type(file.name)
    return file.read_bytes(), content_type or "application/octet-stream"


def read_inference_key(key: str) -> str:
    """The key itself, or the inference key from a ``key_file.json`` path."""
    path = Path(key)
    if path.suffix == ".json" or path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CommandError(f"{key} is not a TorchServe key file: {error}") from None
    return key


def run_predict(args: argparse.Namespace) -> int:
    from ts_handlers.tools.client import TorchServeClient, TorchServeError

    body, content_type = request_body(args.text, args.file, args.query)

    def answer(client: TorchServeClient, name: str) -> int:
        return _predict_and_print(
            client,
            name,
            body,
            content_type,
            args.text,
            TorchServeError,
            explain=args.explain,
            html=args.html,
        )

    if args.url:
        name = Path(args.archive).stem if args.archive.endswith(".mar") else args.archive
        with TorchServeClient(
            args.url, inference_key=read_inference_key(args.key), timeout=args.timeout
        ) as client:
            return answer(client, name)

    from ts_handlers.tools.server import LocalTorchServe, TorchServeStartError

    store, (archive,) = resolve_archives([args.archive], args.model_store)
    print(f"starting TorchServe on {archive} ...", file=sys.stderr, flush=True)
    _stop_on_signals()
    try:
        with (
            LocalTorchServe(store, [archive]) as server,
            server.client(timeout=args.timeout) as client,
        ):
            return answer(client, Path(archive).stem)
    except TorchServeStartError as error:
        print(start_error(error), file=sys.stderr)
        return 1


def start_error(error: Exception) -> str:
    """A failed start as a person reads it: the logs, then a model's own load error last."""
    summary = getattr(error, "summary", None)
    return f"{error}\n\n{summary}" if summary else str(error)


def _predict_and_print(
    client: Any,
    name: str,
    body: Any,
    content_type: str | None,
    inputs: Sequence[str] | None,
    error_type: type[Exception],
    *,
    explain: bool = False,
    html: Path | None = None,
) -> int:
    """``explain``: ask ``/explanations/<model>``; ``html``: also draw the answer there."""
    try:
        send = client.explain if explain else client.predict
        answer = send(name, body, content_type=content_type)
    except error_type as error:
        print(error, file=sys.stderr)
        return 1
    print(format_answer(answer, inputs), flush=True)
    if html is not None:
        from ts_handlers.tools.explanation_html import write_html

        try:
            written = write_html(html, answer, inputs, title=f"{name}: token attributions")
        except (ValueError, OSError) as error:
            raise CommandError(f"--html {html}: {error}") from None
        print(f"wrote {written}", flush=True)
    return 0


def format_answer(answer: Any, inputs: Sequence[str] | None = None) -> str:
    """A handler's JSON as a person reads it: labels, embeddings or entities as rows.

    A request of several texts gets one answer per text, each under its text; anything this
    does not recognise is printed as indented JSON.
    """
    if isinstance(answer, bytes):
        return answer.decode("utf-8", errors="replace")
    if _is_explanation(answer):
        return _format_explanation(answer)
    if isinstance(answer, list) and answer and all(map(_is_explanation, answer)):
        names = inputs if inputs and len(inputs) == len(answer) else range(1, len(answer) + 1)
        return "\n".join(
            f"{text}\n{_indent(_format_explanation(row))}"
            for text, row in zip(names, answer, strict=True)
        )
    one_answer_per_text = (
        inputs
        and len(inputs) > 1
        and isinstance(answer, list)
        and len(answer) == len(inputs)
        and all(isinstance(row, list) for row in answer)
    )
    if isinstance(answer, list) and not answer:
        return "(nothing found)"
    from ts_handlers.tasks import tasks

    for task in tasks().values():  # each task prints the answers of its own shape
        shown = task.format_answer(answer, inputs)
        if shown is not None:
            return shown
    if one_answer_per_text:
        return "\n".join(
            f"{text}\n{_indent(format_answer(row))}"
            for text, row in zip(inputs, answer, strict=True)
        )
    return json.dumps(answer, indent=2, ensure_ascii=False)


def _is_explanation(answer: Any) -> bool:
    return isinstance(answer, dict) and {"label", "score", "tokens", "attributions"} <= set(answer)


def _format_explanation(answer: dict[str, Any]) -> str:
    """The label and score, then each token with its attribution, one a line."""
    tokens = [str(token) for token in answer["tokens"]]
    width = max((len(token) for token in tokens), default=0)
    rows = [
        f"  {token:<{width}}  {value:+.4f}"
        for token, value in zip(tokens, answer["attributions"], strict=False)
    ]
    return "\n".join([f"{answer['label']}  {answer['score']:.4f}", *rows])


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


# ---- kserve ----------------------------------------------------------------------------------


def run_kserve(args: argparse.Namespace) -> int:
    from ts_handlers.tools import kserve

    if args.archives:
        store, names = resolve_archives(args.archives, args.model_store)
    else:
        store = (args.model_store or DEFAULT_MODEL_STORE).resolve()
        names = sorted(path.name for path in store.glob("*.mar")) if store.is_dir() else []
        if not names:
            raise CommandError(f"no .mar in {store}; build archives first or name some")
    try:
        layout = kserve.write_layout(
            args.out_dir,
            [store / name for name in names],
            name=args.name or kserve.DEFAULT_SERVICE_NAME,
            storage_uri=args.storage_uri or kserve.DEFAULT_STORAGE_URI,
            protocol=args.protocol,
            image=args.image,
            force=args.force,
        )
    except kserve.LayoutError as error:
        raise CommandError(str(error)) from None
    for archive in layout.archives:
        workers = archive.workers
        print(
            f"model:    {archive.name} ({archive.path.name}; batchSize {workers['batchSize']}, "
            f"maxBatchDelay {workers['maxBatchDelay']} ms, workers "
            f"{workers['minWorkers']}-{workers['maxWorkers']})"
        )
    print(f"config:   {layout.config}")
    print(f"metrics:  {layout.metrics_config}")
    print(f"archives: {layout.model_store}/")
    print(f"manifest: {layout.manifest}")
    plugin = [archive for archive in layout.archives if archive.plugin_mode]
    if plugin:
        extras = sorted({extra for archive in plugin for extra in archive.extras})
        requirement = f"ts-handlers[{','.join(extras)}]" if extras else "ts-handlers"
        packages = sorted({package for archive in plugin for package in archive.packages})
        requirement = " ".join([f"'{requirement}'", *packages])
        print(
            f"note:     {', '.join(a.path.name for a in plugin)} name their handler by module "
            f"path: the predictor image needs `pip install {requirement}` (docs/kserve.md)"
            + ("" if args.image else "; pass --image with it")
        )
    print(f"next: copy {args.out_dir}/ to the storage URI, then kubectl apply -f {layout.manifest}")
    return 0


# ---- init ------------------------------------------------------------------------------------


def setup_for_model(
    model_path: Path, config_dir: Path, options: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(setup_config.json, index_to_name.json or None) for a model folder or file: the first
    task of the registry that recognises it (``Task.init``) writes them, given the ``options``
    the tasks add to init (tasks.InitOption) by name.

    Paths are written relative to ``config_dir``: the build reads them from there.
    """
    from ts_handlers.tasks import tasks

    if not model_path.exists():
        raise CommandError(f"{model_path} does not exist")
    relative = os.path.relpath(model_path.resolve(), config_dir.resolve())
    for task in tasks().values():
        found = task.init_setup(model_path, relative, dict(options or {}))
        if found is not None:
            return found
    takes = "; ".join(task.init_takes for task in tasks().values() if task.init_takes)
    if model_path.is_file():
        raise CommandError(f"{model_path}: no task serves this file; init takes {takes}")
    hf_config = read_json_object(model_path / "config.json")
    if hf_config is None:
        raise CommandError(
            f"{model_path} has neither modules.json (sentence-transformers) nor config.json "
            f"(Hugging Face); init takes {takes}"
        )
    architectures = hf_config.get("architectures") or []
    raise CommandError(
        f"{model_path}/config.json names architectures {architectures}; init takes {takes}"
    )


def run_init(args: argparse.Namespace) -> int:
    from ts_handlers.labels import LABELS_FILE
    from ts_handlers.tasks import load_task_config
    from ts_handlers.tools.build import MODEL_CONFIG_FILE

    model_path: Path = args.model
    hub_model = None
    from ts_handlers.tools import hub

    if hub.looks_like_hub_id(str(model_path)):
        # A Hub id: the files come from huggingface_hub's cache (downloaded when online);
        # model_name keeps the id, and the build records the revision it resolves to.
        hub_model = hub.resolve(str(model_path))
        print(f"{hub_model.repo_id}: revision {hub_model.revision} in {hub.cache_dir()}")
        model_path = hub_model.folder
    default_name = model_path.stem if model_path.is_file() else model_path.resolve().name
    if hub_model is not None:
        default_name = hub_model.repo_id.rsplit("/", 1)[-1]
    name = args.name or default_name
    if not ARCHIVE_NAME.match(name):
        raise CommandError(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
    config_dir = args.configs_root / name
    if config_dir.exists() and not args.force:
        raise CommandError(f"{config_dir} exists; pass --force to replace it")
    options = {dest: getattr(args, dest) for dest in getattr(args, "task_options", ())}
    setup, labels = setup_for_model(model_path, config_dir, options)
    if hub_model is not None:
        setup["model_name"] = hub_model.repo_id
    if config_dir.exists():
        shutil.rmtree(config_dir)
    config_dir.mkdir(parents=True)
    try:
        (config_dir / SETUP_CONFIG_FILE).write_text(json.dumps(setup, indent=2) + "\n")
        (config_dir / MODEL_CONFIG_FILE).write_text(MODEL_CONFIG_TEXT)
        if labels:
            (config_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
        task, _ = load_task_config(config_dir / SETUP_CONFIG_FILE)
    except ConfigError:
        shutil.rmtree(config_dir)  # a half-written folder would be built by --all
        raise
    written = ", ".join(sorted(path.name for path in config_dir.iterdir()))
    print(f"wrote {config_dir}/ ({written}) for task {task.mode}")
    print(f"next: ts-handlers build {config_dir}")
    return 0


# ---- import ----------------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    """An archive made for TorchServe's example handler, rewritten as a verified one of ours."""
    from ts_handlers.export import ExportError
    from ts_handlers.tools import importer

    name = args.name or args.archive.stem
    if not ARCHIVE_NAME.match(name):
        raise CommandError(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
    store = args.model_store
    target = store / f"{name}.mar"
    if target.resolve() == args.archive.resolve():
        raise CommandError(f"{target} is the archive being imported; pass --name or --model-store")
    if target.exists() and not args.force:
        raise CommandError(f"{target} exists; pass --force to replace it")
    store.mkdir(parents=True, exist_ok=True)
    try:
        report = importer.import_archive(args.archive, store, name)
    except ExportError as error:
        raise CommandError(str(error)) from None
    print(importer.summary(report))
    print(f"report: {store / (name + '.import.json')}")
    print(f"next: ts-handlers serve {target}")
    return 0


# ---- handler-file ----------------------------------------------------------------------------


def run_handler_file(args: argparse.Namespace) -> int:
    """Prints the one-line handler file ``torch-model-archiver --handler`` takes for a task."""
    from ts_handlers.handler_files import handler_file

    try:
        print(handler_file(args.task))
    except KeyError as error:
        raise CommandError(error.args[0]) from None
    return 0


# ---- the command -----------------------------------------------------------------------------


def make_parser(task_options: bool = True) -> argparse.ArgumentParser:
    """The command line; ``task_options``: with the options tasks add to ``init``."""
    parser = argparse.ArgumentParser(
        prog="ts-handlers",
        description="Build, serve and query TorchServe archives of ts_handlers models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The build's own parser reads the rest (`ts-handlers build --help` shows its options).
    build = commands.add_parser(
        "build", help="export, verify and archive config folders", add_help=False
    )
    build.add_argument("build_args", nargs=argparse.REMAINDER)
    build.set_defaults(run=lambda args: run_build(args.build_args))

    serve = commands.add_parser("serve", help="run TorchServe on archives until Ctrl-C")
    serve.add_argument("archives", nargs="*", help="names in the model store, or .mar paths")
    serve.add_argument(
        "--model-store", type=Path, help="default: the archives' folder, else model_store"
    )
    serve.add_argument(
        "--enable-model-api",
        action="store_true",
        help="allow register/unregister at run time (archives in the model store only)",
    )
    serve.set_defaults(run=run_serve)

    predict = commands.add_parser("predict", help="send one request and print the answer")
    predict.add_argument(
        "archive", help="a .mar path, a name in the model store, or (--url) a model"
    )
    body = predict.add_mutually_exclusive_group(required=True)
    body.add_argument("--text", nargs="+", help="one or more texts, sent as {'inputs': ...}")
    body.add_argument("--file", type=Path, help="an image, or a .txt / .json body")
    predict.add_argument(
        "--query",
        help="rerank the --text texts against this query (a cross-encoder archive, "
        "text-embeddings-inference's /rerank)",
    )
    predict.add_argument("--url", help="a running server's inference URL (needs --key)")
    predict.add_argument("--key", help="its inference key, or its key_file.json")
    predict.add_argument(
        "--model-store", type=Path, help="default: the archive's folder, else model_store"
    )
    predict.add_argument("--timeout", type=float, default=120.0, help="seconds for the answer")
    predict.add_argument(
        "--explain",
        action="store_true",
        help="ask /explanations/<model> for token attributions (captum_explanation archives)",
    )
    predict.add_argument(
        "--html", type=Path, help="with --explain: also draw the attributions in this HTML file"
    )
    predict.set_defaults(run=run_predict)

    kserve = commands.add_parser(
        "kserve", help="write what KServe mounts and an InferenceService manifest"
    )
    kserve.add_argument("out_dir", type=Path, help="gets config/, model-store/ and the manifest")
    kserve.add_argument(
        "archives", nargs="*", help="names in the model store or .mar paths (default: all there)"
    )
    kserve.add_argument(
        "--model-store", type=Path, help="default: the archives' folder, else model_store"
    )
    kserve.add_argument("--name", default=None, help="the InferenceService's name")
    kserve.add_argument("--storage-uri", default=None, help="where KServe finds the folder")
    kserve.add_argument("--protocol", choices=("v1", "v2"), default="v1", help="KServe protocol")
    kserve.add_argument(
        "--image", help="the predictor image (one with ts-handlers and TorchServe 0.12)"
    )
    kserve.add_argument("--force", action="store_true", help="replace what an earlier run wrote")
    kserve.set_defaults(run=run_kserve)

    importer = commands.add_parser(
        "import",
        help="rewrite an archive made for TorchServe's example handler as a verified one",
        description="Reads a .mar made for TorchServe's Hugging Face example handler (its "
        "setup_config.json, serialized model, index_to_name.json and tokenizer files) and "
        "writes a verified archive served by ts_handlers, with a report of what was checked.",
    )
    importer.add_argument("archive", type=Path, help="the old .mar")
    importer.add_argument("--name", help="the new archive's name (default: the old one's)")
    importer.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE)
    importer.add_argument("--force", action="store_true", help="replace an existing archive")
    importer.set_defaults(run=run_import)

    handler = commands.add_parser(
        "handler-file",
        help="print the handler file for torch-model-archiver --handler",
        description="Prints the path of a one-line handler file (it imports the task's handle "
        "from the installed ts_handlers) to pass as torch-model-archiver --handler.",
    )
    handler.add_argument("task", help="a task (mode), e.g. sequence_classification")
    handler.set_defaults(run=run_handler_file)

    init = commands.add_parser("init", help="write archiver_configs/<name>/ for a model")
    init.add_argument(
        "model",
        type=Path,
        help="a sentence-transformers folder, a Hugging Face classifier folder or Hub id "
        "(owner/name), a TorchScript .pt",
    )
    init.add_argument("--name", help="config folder and archive name (default: the model's)")
    init.add_argument("--configs-root", type=Path, default=DEFAULT_CONFIGS_ROOT)
    init.add_argument("--force", action="store_true", help="replace an existing config folder")
    if task_options:
        # Each task's own options (tasks.InitOption), read from the registry: only for init,
        # as reading it imports every task.
        from ts_handlers.tasks import tasks

        dests: list[str] = []
        flags: set[str] = set()
        for task in tasks().values():
            for option in task.init_options:
                if flags.isdisjoint(option.flags):  # two tasks may share one (first wins)
                    flags.update(option.flags)
                    dests.append(init.add_argument(*option.flags, **option.settings).dest)
        init.set_defaults(task_options=tuple(dests))
    init.set_defaults(run=run_init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        # Straight to the build's parser: argparse's REMAINDER would refuse a leading option
        # (`ts-handlers build --all`).
        return run_build(argv[1:])
    parser = make_parser(task_options=argv[:1] == ["init"])
    args = parser.parse_args(argv)
    if args.command == "predict" and bool(args.url) != bool(args.key):
        parser.error("predict: --url and --key go together (a running server wants its key)")
    if args.command == "predict" and args.html and not args.explain:
        parser.error("predict: --html draws an explanation; add --explain")
    try:
        return args.run(args)
    except (CommandError, ConfigError) as error:
        print(f"ts-handlers {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # any server was stopped on the way out
        return 130


if __name__ == "__main__":
    sys.exit(main())
