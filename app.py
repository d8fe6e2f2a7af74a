"""LoRA Studio: `python app.py` launches the web studio (Gradio). See README.md for the flags.

On Hugging Face Spaces this file is the app_file: it runs as is (Spaces sets the host and port).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """'user:password', or a file with one 'user:password' per line (# comments allowed)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text("utf-8").splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        source = str(path)
    else:
        entries, source = [spec], "--auth"
    pairs = []
    for e in entries:
        user, sep, password = e.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{source}: expected user:password, got {e.split(':')[0]!r}:…")
        pairs.append((user.strip(), password))
    return pairs


def users_per_address(value: int | None) -> int:
    """--users-per-address, default 4; 0 on Hugging Face Spaces (SPACE_ID set), where every client shows the
    proxy's address."""
    return value if value is not None else (0 if os.environ.get("SPACE_ID") else 4)


# --demo's defaults for the per-user limits (flags given on the command line still win): a visitor's sandbox
DEMO_DEFAULTS = dict(max_job_steps=200, max_job_tokens=500_000, max_job_minutes=15, max_adapters_per_user=10,
                     max_library_per_user="200MB", max_datasets_per_user=5, max_datasets_size_per_user="50MB")
SPACE_DISK = Path("/data")  # a Hugging Face Space's persistent storage, where its owner turned it on


def demo_mode(demo: bool | None, auth) -> bool:
    """--demo, or by default on a Hugging Face Space (SPACE_ID set) without --auth."""
    if demo and auth:
        raise ValueError("--demo is a public studio without sign-in: drop --auth or --demo.")
    return demo if demo is not None else bool(os.environ.get("SPACE_ID")) and not auth


def parse_args(argv=None) -> tuple[argparse.Namespace, list[tuple[str, str]] | None, bool]:
    """(the flags, --auth's users, whether demo mode is on); in demo mode the per-user limits that the command
    line leaves out are DEMO_DEFAULTS."""
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    if not demo_mode(args.demo, auth):
        return args, auth, False
    return build_parser(DEMO_DEFAULTS).parse_args(argv), auth, True


def data_dir(value: str | None, space_disk: Path = SPACE_DISK) -> Path:
    """--data-dir, default the Space's persistent storage where there is one (it survives restarts), else '.'."""
    if value:
        return Path(value).expanduser()
    if os.environ.get("SPACE_ID") and space_disk.is_dir() and os.access(space_disk, os.W_OK):
        return space_disk
    return Path(".")


def ephemeral_disk(library, space_disk: Path = SPACE_DISK) -> bool:
    """Whether the library is on a Space's disk that a restart wipes (outside its persistent storage)."""
    return bool(os.environ.get("SPACE_ID")) and not Path(library).resolve().is_relative_to(space_disk.resolve())


def gallery_dir(value: str | None) -> Path | None:
    """--gallery, default ./gallery when it exists."""
    if value and not Path(value).expanduser().is_dir():
        raise ValueError(f"--gallery {value}: no such folder.")
    return Path(value).expanduser() if value else (Path("gallery") if Path("gallery").is_dir() else None)


def job_tokens(value: float) -> int:
    """--max-job-tokens as a whole number ('1e8' is accepted on the command line)."""
    if not 1 <= value <= 2**62 or value != int(value):  # NaN fails the first test
        raise ValueError(f"--max-job-tokens must be a whole number of at least 1 (got {value:g}).")
    return int(value)


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="LoRA Studio: fine-tune GPT-2 with LoRA in a web UI.")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; "
                                                 "0.0.0.0 to serve the network; Spaces sets it)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--model", default="gpt2", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"],
                   help="base model selected when a page opens (default gpt2; nothing loads until needed)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="local weights for --model (an HF folder or a .safetensors file) instead of the hub")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the library and datasets live (default: /data on a Hugging Face Space with "
                        "persistent storage, else the current folder)")
    p.add_argument("--library", default=None, metavar="DIR", help="adapter library folder (default DATA_DIR/adapters)")
    p.add_argument("--datasets", default=None, metavar="DIR", help="datasets folder (default DATA_DIR/datasets)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the frozen base's dtype: auto (default) is bf16 where the device computes it natively "
                        "(CUDA, CPUs with AVX-512 BF16/AMX, Apple M2+), else fp32; LoRA weights stay fp32")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD|FILE",
                   help="require sign-in: one user:password, or a file of user:password lines")
    demo_limits = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items())
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=None,
                   help="public demo: each visitor (known by a cookie) gets a private sandbox of datasets, adapters "
                        "and jobs, deleted --demo-idle-minutes after their last visit, under smaller per-user limits "
                        f"({demo_limits}) (default: on for a Hugging Face Space without --auth)")
    p.add_argument("--demo-idle-minutes", type=float, default=60, metavar="MINUTES",
                   help="--demo: minutes a visitor's sandbox is kept after their last visit (default 60)")
    p.add_argument("--gallery", default=None, metavar="DIR",
                   help="adapters (PEFT folders or .zip files) that every visitor sees and uses but nobody can "
                        "rename, delete or overwrite (default: ./gallery when it exists)")
    p.add_argument("--admin", action="append", default=[], metavar="USER",
                   help="with --auth: a user who may stop, resume, rename and delete anyone's runs (repeatable)")
    p.add_argument("--max-file-size", default="300mb", help="largest upload (default 300mb)")
    p.add_argument("--max-train-memory", default=None, metavar="SIZE",
                   help="refuse training settings whose estimated peak memory exceeds SIZE, e.g. 8GB "
                        "(default: the memory available on the device)")
    p.add_argument("--max-rows-per-user", type=int, default=8, metavar="N",
                   help="rows one user may have generating or waiting (a Compare of the base "
                        "and 3 adapters is 4 rows; default 8)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="new tokens one Compare request may ask for per column (default 512, the slider's end)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="CPU threads torch uses per operation, for generation and training alike (default: torch's "
                        "choice, one per core); on a small CPU where people generate while a run trains, 1 avoids "
                        "oversubscribing the cores (docs/performance.md)")
    p.add_argument("--max-jobs-per-user", type=int, default=1, metavar="N",
                   help="training jobs one user (signed in, or one browser) may have queued or running (default 1)")
    p.add_argument("--max-queued-per-user", type=int, default=8, metavar="N",
                   help="requests one user may have waiting or running in the queue (default 8); one user's backlog "
                        "never refuses another user's first request")
    p.add_argument("--users-per-address", type=int, default=None, metavar="N",
                   help="without --auth: one client address counts as N users for the per-user limits (requests, "
                        "jobs), as a page can pick a new id but not a new address (default 4; 0 turns it off, the "
                        "default on Hugging Face Spaces, whose proxy gives every client one address)")
    p.add_argument("--max-job-tokens", type=float, default=1e8, metavar="TOKENS",
                   help="tokens one training job may train: steps x batch x accumulation x sequence length "
                        "(default 1e8)")
    p.add_argument("--max-job-steps", type=int, default=None, metavar="N",
                   help="optimizer steps one training job may train (default: no limit; --max-job-tokens still holds)")
    p.add_argument("--max-job-minutes", type=float, default=None, metavar="MINUTES",
                   help="minutes one training job may train; then it is stopped and saved (default: no limit)")
    p.add_argument("--admin-token", default=os.environ.get("LORA_STUDIO_ADMIN_TOKEN"), metavar="TOKEN",
                   help="a secret (16+ characters) that lets whoever enters it on the Train tab stop any job, for "
                        "the person running the server without --auth (default: $LORA_STUDIO_ADMIN_TOKEN, which "
                        "keeps it out of the process list)")
    p.add_argument("--train-capacity", type=int, default=None, metavar="TOKENS",
                   help="tokens per shared training step (the running jobs' rows x the longest sequence); "
                        "jobs beyond it wait in the queue (default: 4096 on CPU/MPS, from free memory on CUDA)")
    p.add_argument("--min-free-disk", default="1GB", metavar="SIZE|PCT%",
                   help="refuse saves, uploads, datasets and new training runs that would leave less free disk than "
                        "this, e.g. 1GB or 5%% (default 1GB; 0: no floor)")
    p.add_argument("--max-adapters-per-user", type=int, default=100, metavar="N",
                   help="with --auth: library entries one user may own (default 100; 0: no limit; admins: none)")
    p.add_argument("--max-library-per-user", default="5GB", metavar="SIZE",
                   help="with --auth: disk one user's library entries may take, checkpoints included (default 5GB)")
    p.add_argument("--max-datasets-per-user", type=int, default=50, metavar="N",
                   help="with --auth: datasets one user may prepare (default 50; 0: no limit)")
    p.add_argument("--max-datasets-size-per-user", default="2GB", metavar="SIZE",
                   help="with --auth: disk one user's datasets may take (default 2GB)")
    p.set_defaults(**(defaults or {}))
    return p


def main(argv=None) -> int:
    try:
        args, auth, demo_on = parse_args(argv)
        data, gallery = data_dir(args.data_dir), gallery_dir(args.gallery)
        library, datasets = args.library or data / "adapters", args.datasets or data / "datasets"
        if args.weights and not Path(args.weights).expanduser().exists():
            raise ValueError(f"--weights {args.weights}: no such file or folder.")
        if args.admin and not auth:
            raise ValueError("--admin names a signed-in user: use it with --auth.")
        unknown = sorted(set(args.admin) - {user for user, _ in auth or []})
        if unknown:
            raise ValueError(f"--admin {unknown[0]}: no such user in --auth.")
        if args.weights and args.model == "tiny":
            raise ValueError("--weights are for a real GPT-2 size (--model gpt2 ... gpt2-xl); 'tiny' is random.")
        from core.api import Quota
        from studio.app import build_ui, create_studio, launch_options
        quota = Quota.for_studio(args.min_free_disk, args.max_adapters_per_user, args.max_library_per_user,
                                 args.max_datasets_per_user, args.max_datasets_size_per_user)
        studio = create_studio(library, datasets, args.device, args.model, args.weights, auth=bool(auth) or demo_on,
                               max_train_memory=args.max_train_memory, admins=args.admin,
                               max_rows_per_user=args.max_rows_per_user,
                               max_new_tokens=args.max_new_tokens, torch_threads=args.torch_threads,
                               max_jobs_per_user=args.max_jobs_per_user, train_capacity=args.train_capacity,
                               precision=args.precision,
                               max_queued_per_user=args.max_queued_per_user,
                               users_per_address=users_per_address(args.users_per_address),
                               max_job_tokens=job_tokens(args.max_job_tokens), admin_token=args.admin_token or None,
                               quota=quota, max_job_steps=args.max_job_steps, max_job_minutes=args.max_job_minutes)
        if demo_on:
            from studio.demo import install
            install(studio, args.demo_idle_minutes, ephemeral_disk(library))
        if gallery:
            from studio.demo import open_gallery
            open_gallery(studio, gallery)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_ui(studio)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                **launch_options(args.max_file_size, studio.demo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
