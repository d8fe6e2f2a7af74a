"""LoRA Studio's public API: what a client of the engine (the studio, a tool) imports from core, in one place.

A client imports this module, not core's parts: the parts can then move and split without touching the
clients, and the rules the engine depends on live here or below, never in a client: training jobs go
through `Runs` (core.train.runs), which owns their rules (names reserved in the library, memory checks,
budgets, resume, who may stop, per-user and per-address limits) for the studio and the CLI alike.
Sections: the engine and its device; models; the adapter library and exports; datasets and their
imports; training settings, estimates and jobs; generation, evaluation and the arena; checks, quotas,
sandboxes and ZeroGPU calls.
"""
from __future__ import annotations

from core.adapters.export import zip_merged
from core.adapters.gguf_export import GGUF_TYPES
from core.adapters.library import AdapterEntry, check_name, split_spec
from core.adapters.metrics import write_metrics
from core.adapters.run_record import CHART_POINTS, thin
from core.adapters.validate import AdapterError, preset_of
from core.arena import BASE, Arena, Round, Sampling
from core.arena import MAX_MODELS as ARENA_MAX_MODELS
from core.atomic import disk_full
from core.checks import MAX_PROMPT_CHARS, check_text, is_real, is_text, is_whole, scrub
from core.device import default_dtype, pick_device, precision_dtype, precision_name
from core.engine import Engine
from core.generate.sampling import SamplingConfig
from core.generate.scheduler import SchedulerBusy
from core.lora.config import LoraConfig, normalize_targets
from core.lora.patterns import parse_pattern
from core.lora.variants import INITS
from core.model import tokenizer
from core.model.config import ATTN_OUT, ATTN_QKV, HUB_IDS, MLP_DOWN, MLP_UP, PRESETS, TARGET_MODULES
from core.model.weights import WeightsError, check_preset_shape, hub_reachable
from core.quota import Quota
from core.sandbox import (Sandboxes, check_not_gallery, clean, import_gallery, is_visitor, owners_on_disk,
                          visitor_name)
from core.train.config import TrainConfig
from core.train.data import (TEXT_SUFFIXES, Dataset, build_dataset, join_documents, list_samples, load_dataset,
                             load_sample, normalize_text, read_dataset_meta, read_text_file, text_stats)
from core.train.datasets import DatasetStore, is_dataset_folder
from core.train.estimate import check_memory, estimate_training, human_bytes, human_seconds, parse_size
from core.train.evaluate import EVAL_TOKENS
from core.train.evaluate import MAX_MODELS as EVAL_MAX_MODELS
from core.train.evaluate import text_ids
from core.train.imports import RECORD_SUFFIXES, Fields, pick, preview_records, read_records
from core.train.instruct import DEFAULT_TEMPLATE, check_template, dataset_from_records, encode_example, render_prompt
from core.train.jobs import JobSpec, TrainJob, TrainScheduler
from core.train.runs import Runs
from core.train.trackers import REPORT_TO, make_trackers
from core.train.trainer import TrainingError, find_checkpoint
from core.zerogpu_calls import ChunkJob, GpuCalls


__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
