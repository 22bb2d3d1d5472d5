"""qbench command line: a thin typer layer over the library.

Each command parses its options, calls one library function, prints. Bad input
(QbenchError) prints one sentence on stderr and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import api, safeload
from . import bench as benchmarks
from .analysis import inspect_run
from .analysis.ops import ops_md, ops_report
from .analysis.sensitivity import layer_sensitivity
from .bench import bench_calib_memory as run_memory
from .bench import bench_eval as run_bench
from .bench import bench_sweep as run_sweep
from .calibration import build_manifest, heldout_data, load_manifest, save_manifest
from .comparison import compare as run_compare
from .comparison import compare_md, compare_profiles
from .data.default import default_data, synth_dataset
from .errors import QbenchError
from .evaluation import EvalSettings, evaluate, format_table
from .files import check_writable, command_line, sweep_scratch, write_json
from .models.export import export_onnx
from .peers import bench_peers
from .pipeline import run as run_pipeline
from .quantization.engines import IncConfig, engine_named
from .quantization.recipe import MIN_CALIB
from .report import report as write_report
from .train import train as run_train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="INT8 quantization and validation workbench for YOLO detectors.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: the embedded synthetic traffic-sign set.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks whose outputs are committed under results/.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


PROFILE_HELP = ("NPU profile applied on top of the recipe: cpu, npu-symmetric, npu-symmetric-pow2 (configs/npu/) "
                "or a YAML.")
FUSION_HELP = "Conv+activation quantization: fused | unfused | ort (overrides the profile's activation_fusion)."


@app.callback()
def _options(
    trust_weights: Optional[list[Path]] = typer.Option(
        None, "--trust-weights", help="Load this .pt with full unpickling, which runs any code pickled in it (by "
        "default only the classes a YOLO checkpoint holds are unpickled and anything else is refused). Only for "
        "files you trust; repeat for several."),
):
    """INT8 quantization and validation workbench for YOLO detectors."""

    for p in trust_weights or []:
        safeload.trust(p)
        _say(f"warning: --trust-weights: '{p}' will be fully unpickled; any code in it runs.")


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _sizes(text: str) -> list[int]:
    """'32,64,128' -> [32, 64, 128] (calibration sizes)."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise QbenchError(f"--sizes '{text}' must be comma-separated positive whole numbers, e.g. 32,64,128.")
    return sizes


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write images/, labels/ and data.yaml into."),
    train: int = typer.Option(1200, help="Number of training images."),
    val: int = typer.Option(200, help="Number of validation images."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same images."),
):
    """Generate the synthetic traffic-sign detection set (4 GTSDB superclasses)."""

    yaml_path = synth_dataset(out, n_train=train, n_val=val, seed=seed, progress=True)
    typer.echo(str(yaml_path))


@data_app.command("heldout")
def data_heldout(
    data: Path = typer.Option(..., "--data", help="data.yaml of the dataset."),
    calib_manifest: Path = typer.Option(..., "--calib", help="The calibration manifest quantization uses."),
    out: Path = typer.Option(..., "--out", help="data.yaml to write (its image list goes beside it as .txt)."),
    n_used: int = typer.Option(128, "--n-used", help="Calibration images the recipe uses (its calib_size)."),
    split: str = typer.Option("train", help="Split to take the held-out images from."),
):
    """A data.yaml scoring a split's images that calibration does not use (e.g. train minus the first 128 of the
    manifest): a larger INT8-vs-FP32 check than a small val split."""

    y = heldout_data(data, calib_manifest, out, n_used=n_used, split=split)
    typer.echo(f"wrote {y} and {y.with_suffix('.txt')}")


@app.command()
def train(
    model: str = typer.Argument("yolo11n-l3-leaky", help="Model config (name in configs/models/ or a .yaml) or a .pt to fine-tune."),
    data: Path = typer.Option(..., "--data", help="data.yaml of the dataset."),
    out: Path = typer.Option(..., "--out", help="Run folder, e.g. results/training/my-run."),
    epochs: int = typer.Option(100),
    imgsz: int = typer.Option(320),
    batch: int = typer.Option(16),
    device: str = typer.Option("cpu", help="'cpu' or a CUDA device such as '0'."),
    seed: int = typer.Option(0),
    workers: int = typer.Option(2),
    close_mosaic: int = typer.Option(10, help="Turn mosaic augmentation off for the last N epochs."),
    hours: Optional[float] = typer.Option(None, "--time", help="Train for this many hours instead of --epochs (the LR schedule fits the budget)."),
):
    """Train a detector with ultralytics, offline; writes weights/best.pt, args.yaml, results.csv, train.json."""

    best = run_train(model, str(data), out, epochs=epochs, imgsz=imgsz, batch=batch, device=device, seed=seed,
                     workers=workers, close_mosaic=close_mosaic, **({"time": hours} if hours else {}))
    typer.echo(str(best))


@app.command()
def export(
    weights: Path = typer.Argument(..., help="Trained checkpoint (best.pt)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .onnx (default: next to the weights, fp32.onnx)."),
    imgsz: Optional[int] = typer.Option(None, help="Input size (default: the size the model was trained at)."),
    opset: int = typer.Option(17, help="ONNX opset (at most 20: ONNX Runtime's INT8 quantizer rejects newer)."),
):
    """Export a checkpoint to an FP32 ONNX (no NMS, dynamic batch) carrying class names, imgsz and stride."""

    out = out or weights.with_name(weights.stem + ".onnx")
    typer.echo(str(export_onnx(weights, out, imgsz=imgsz, opset=opset)))


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Model to evaluate: .onnx (ONNX Runtime) or .pt (PyTorch)."),
    data: Path = typer.Option(..., "--data", help="data.yaml of the dataset."),
    split: str = typer.Option("val"),
    imgsz: Optional[int] = typer.Option(None, help="Default: the model's own input size."),
    batch: int = typer.Option(16),
    conf: float = typer.Option(0.001, help="Confidence threshold (ultralytics' val default)."),
    iou: float = typer.Option(0.7, help="NMS IoU threshold (ultralytics' val default)."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: all cores)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write metrics.json here."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (smoke tests)."),
    runtime: str = typer.Option("ort", "--runtime", help="What runs the .onnx models: ort (ONNX Runtime's CPU EP) "
                                "or openvino (OpenVINO's runtime, which runs Conv+activation fused in int8)."),
):
    """Evaluate a model: mAP50, mAP50-95, precision, recall and per-class AP, as `yolo val` computes them."""

    settings = EvalSettings(split=split, imgsz=imgsz, batch=batch, conf=conf, iou=iou, threads=threads, limit=limit,
                            runtime=runtime)
    if out:

        check_writable(out.parent, "metrics.json")
    result = evaluate(model, data, settings, progress=True)
    typer.echo(format_table(result))
    if result["model"].get("runtime_caveat"):
        typer.echo(f"Warning: these numbers are the runtime's, not the model's: {result['model']['runtime_caveat']}")
    t = result["timing"]
    typer.echo(f"{result['data']['images']} images in {t['wall_s']:.1f} s "
               f"({t['inference_ms_per_image']:.1f} ms/image inference)")
    if out:
        write_json(result, out)
        typer.echo(f"wrote {out}")


@app.command()
def calib(
    data: Optional[Path] = typer.Option(None, "--data", help="data.yaml of the dataset (default: the embedded synthetic set)."),
    out: Path = typer.Option(..., "--out", help="Manifest to write, e.g. calibration/mydata-train-128.json."),
    n: int = typer.Option(128, "--n", help="Number of images."),
    split: str = typer.Option("train", help="Split to sample (never the one you score)."),
    seed: int = typer.Option(0),
):
    """Build a calibration manifest: a seeded, class-stratified sample (paths + sha256) that later runs reuse."""

    if out.exists():
        raise QbenchError(f"'{out}' already exists; a manifest is a record later runs rely on, so choose another "
                          "--out or delete it first.")
    if not isinstance(n, int) or n < MIN_CALIB:
        raise QbenchError(f"--n {n} is too few: quantization needs at least {MIN_CALIB} calibration images "
                          "(default 128).")
    check_writable(out.parent, "the manifest")
    m = build_manifest(data or default_data(progress=True), n, split=split, seed=seed)
    save_manifest(m, out)
    typer.echo(f"wrote {out}: {m['n']} images of '{split}' (seed {seed}), images per class {m['class_counts']}")


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="FP32 .onnx (from `qbench export`) or a .pt (exported first)."),
    out: Path = typer.Option(..., "--out", help="INT8 .onnx to write; recipe.yaml goes next to it."),
    calib_manifest: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest from `qbench calib`."),
    data: Optional[Path] = typer.Option(None, "--data", help="Or: sample the calibration set from this data's train split."),
    recipe: str = typer.Option("default", help="Recipe name in configs/recipes/ or a YAML path."),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    fusion: Optional[str] = typer.Option(None, "--fusion", help=FUSION_HELP),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Accuracy budget in mAP50-95 points (0.3 = "
                                             "0.003): keep the fewest convs in FP32, sensitivity-ranked, until the "
                                             "drop on --data's val split is within it (mixed.json, sensitivity.csv "
                                             "go next to --out). --data is then the scored data; calibration comes "
                                             "from --calib, else from its train split."),
    max_float: Optional[int] = typer.Option(None, "--max-float", help="With --max-drop: most convs allowed out "
                                            "of INT8 (default: 10% of the quantized convs)."),
    fallback: str = typer.Option("float", "--fallback", help="With --max-drop: the precision a conv leaves INT8 "
                                 "for: float (FP32, on the host CPU of an NPU) or int16 (16-bit Q/DQ, for targets "
                                 "whose int_types list int16)."),
    engine: str = typer.Option("ort", "--engine", help="ort: ONNX Runtime static QDQ with the recipe/profile; inc: "
                               "Intel Neural Compressor's mAP-driven autotune of the .pt (needs --data), exported to "
                               "an ONNX with int8 convs."),
    tolerable_loss: float = typer.Option(0.01, "--tolerable-loss", help="--engine inc: relative mAP50-95 loss its "
                                         "tuning accepts."),
    max_trials: int = typer.Option(3, "--max-trials", help="--engine inc: tuning trials at most."),
    threads: Optional[int] = typer.Option(None),
    allow_scored_calib: bool = typer.Option(False, "--allow-scored-calib", help="With --max-drop: accept a --calib "
                                            "manifest that holds images of the scored split."),
    runtime: str = typer.Option("ort", "--runtime", help="With --max-drop: what runs the models the budget is "
                                "measured on: ort (ONNX Runtime's CPU EP) or openvino (OpenVINO's runtime; the "
                                "activations are then stored as uint8, as it needs)."),
):
    """Static INT8 PTQ with ONNX Runtime (QDQ), the YOLO decode kept in float; or Intel Neural Compressor."""
    eng = engine_named(engine)
    if eng.name == "inc" and (max_drop is not None or profile or fusion or recipe != "default"):
        raise QbenchError("--engine inc tunes on its own (--tolerable-loss); --recipe, --profile, --fusion and "
                          "--max-drop are ONNX Runtime engine options.")
    if max_drop is None and (max_float is not None or fallback != "float" or runtime != "ort"):
        raise QbenchError("--max-float, --fallback and --runtime only apply with --max-drop (`qbench run --runtime "
                          "openvino` quantizes for OpenVINO and scores it there).")
    if max_drop is None and eng.name == "ort" and (calib_manifest is None) == (data is None):
        raise QbenchError("pass exactly one of --calib MANIFEST.json or --data DATA.yaml for the calibration images.")
    config = IncConfig(tolerable_loss=tolerable_loss, max_trials=max_trials) if eng.name == "inc" else recipe
    if max_drop is not None:
        if data is None:
            raise QbenchError("--max-drop needs --data DATA.yaml: the budget is measured on its val split.")
        r = api.quantize_with_accuracy_control(model, out, config, data=data, max_drop=max_drop, calib=calib_manifest,
                                               profile=profile, fusion=fusion, max_float=max_float, threads=threads,
                                               allow_scored_calib=allow_scored_calib, progress=True,
                                               fallback=fallback, runtime=runtime)
        m = r.report
        typer.echo(f"wrote {out}: mAP50-95 on {m['runtimes'][runtime]} {m['fp32_mAP50-95']:.4f} FP32, "
                   f"{m['int8_mAP50-95']:.4f} all-INT8 (-{m['drop_points']['int8']} points), "
                   f"{m['mixed_mAP50-95']:.4f} mixed (-{m['drop_points']['mixed']} points, budget {max_drop}) with "
                   f"{len(m['float_layers'])} of {m['quantized_convs']} convs in {'INT16' if fallback == 'int16' else 'FP32'}:")
        for f in m["float_layers"]:
            typer.echo(f"  {f['layer']}: {f['why']}")
        typer.echo(f"details: {out.parent / 'mixed.json'}, {out.parent / 'sensitivity.csv'}")
        return
    q = api.quantize(model, out, config, calib=calib_manifest, data=data, profile=profile, fusion=fusion,
                     threads=threads, progress=True)
    report = q.report
    if q.engine == "inc":
        t = report["tuning"]
        typer.echo(f"wrote {out}: INC chose {t['chosen']} after {len(t['trials'])} trials (FP32 mAP50-95 "
                   f"{t['baseline_mAP50-95']}, trials {[x['mAP50-95'] for x in t['trials']]}); "
                   f"{report['graph']['qlinearconv']} QLinearConv after ORT optimization")
        return
    con = report["constraints"]
    typer.echo(f"wrote {out} ({report['size_bytes']['int8'] / 2**20:.1f} MB; {q.qlinear_convs} QLinearConv "
               f"after ORT optimization; {report['head'].get('decode_nodes', 0)} decode nodes kept float)")
    if profile or fusion:
        pow2 = con.get("pow2")
        typer.echo(f"recipe {q.config}: {con.get('qdq_pairs_removed', 0)} Conv->activation Q/DQ pairs removed"
                   + (f", {pow2['values_rounded']} scale values rounded up to powers of two" if pow2 else ""))


@app.command()
def compare(
    fp32: Path = typer.Argument(..., help="FP32 .onnx."),
    int8: Optional[Path] = typer.Argument(None, help="INT8 .onnx (or use --profile instead)."),
    data: Path = typer.Option(..., "--data"),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for compare.json and compare.md (and, with "
                                                           "--profile, one folder per INT8 variant)."),
    batch: int = typer.Option(16),
    threads: Optional[int] = typer.Option(None),
    profiles: Optional[list[str]] = typer.Option(None, "--profile", help="Quantize FP32 under this NPU profile "
                                                 "(configs/npu/ name or YAML); repeat for several."),
    calib_manifest: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest (with --profile)."),
    recipe: str = typer.Option("default", help="Base recipe for --profile (configs/recipes/ name or YAML)."),
    fusion: Optional[str] = typer.Option(None, "--fusion", help=FUSION_HELP),
    both_fusions: bool = typer.Option(False, "--both-fusions", help="Each profile twice: fused and unfused."),
    allow_scored_calib: bool = typer.Option(False, "--allow-scored-calib", help="Accept a --calib manifest that "
                                            "holds images of the scored split (flatters INT8; recorded)."),
    runtime: str = typer.Option("ort", "--runtime", help="What runs the .onnx models: ort (ONNX Runtime's CPU EP) "
                                "or openvino (OpenVINO's runtime, which runs Conv+activation fused in int8)."),
):
    """FP32 vs INT8 through the same evaluation path: P, R, mAP50, mAP50-95, per-class deltas, latency, size.

    With --profile (no INT8 argument): quantize FP32 once per profile and compare every variant in one table."""

    settings = EvalSettings(batch=batch, threads=threads, runtime=runtime)
    if out:

        check_writable(out, "compare.json")
    if profiles:
        if int8 is not None:
            raise QbenchError(f"pass either an INT8 model ({int8}) or --profile, not both: --profile quantizes "
                              "the FP32 model itself.")
        if calib_manifest is None:
            raise QbenchError("--profile needs --calib MANIFEST.json (from `qbench calib`) to quantize the FP32 model.")
        if both_fusions and fusion:
            raise QbenchError("pass --fusion or --both-fusions, not both.")
        fusions = ["fused", "unfused"] if both_fusions else [fusion] if fusion else None
        c = compare_profiles(fp32, data, calib_manifest, profiles, recipe=recipe, fusions=fusions, out=out,
                             settings=settings, progress=True, allow_scored_calib=allow_scored_calib)
    else:
        if int8 is None:
            raise QbenchError("pass an INT8 .onnx to compare with, or --profile P (with --calib) to quantize the "
                              "FP32 model under NPU profiles.")
        used = [flag for flag, given in (("--calib", calib_manifest), ("--recipe", recipe != "default"),
                                         ("--fusion", fusion), ("--both-fusions", both_fusions),
                                         ("--allow-scored-calib", allow_scored_calib)) if given]
        if used:
            raise QbenchError(f"{', '.join(used)} only go with --profile; drop them to compare {int8} as it is.")
        c = run_compare(fp32, int8, data, settings, progress=True)
    md = compare_md(c)
    typer.echo(md)
    if out:
        write_json(c, out / "compare.json")
        (out / "compare.md").write_text(md)
        typer.echo(f"wrote {out}/compare.json, compare.md")


@app.command()
def run(
    weights: Optional[Path] = typer.Option(None, help="Trained best.pt (default: the committed default model)."),
    data: Optional[Path] = typer.Option(None, help="data.yaml (default: the embedded synthetic set, generated on first use)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/qbench/run, run2, ...)."),
    imgsz: Optional[int] = typer.Option(None, help="Default: the size the model was trained at."),
    batch: int = typer.Option(16),
    threads: Optional[int] = typer.Option(None),
    recipe: Optional[str] = typer.Option(None, help="Quantization recipe (configs/recipes/ name or YAML path; "
                                         "default: default, or mean-minmax with --runtime openvino and no "
                                         "--profile/--fusion)."),
    calib_manifest: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest (default: sample the train split)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also score ultralytics' own export(format='onnx', quantize=8)."),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    fusion: Optional[str] = typer.Option(None, "--fusion", help=FUSION_HELP),
    profiles: Optional[str] = typer.Option(None, "--profiles", help="Also quantize and score these NPU profiles, "
                                           "comma-separated (e.g. cpu,npu-symmetric,npu-symmetric-pow2), each "
                                           "into profiles/PROFILE-FUSION/."),
    both_fusions: bool = typer.Option(False, "--both-fusions", help="Each of --profiles twice: fused and unfused."),
    allow_scored_calib: bool = typer.Option(False, "--allow-scored-calib", help="Accept a --calib manifest that "
                                            "holds images of the scored split (flatters INT8; the summary says so)."),
    runtime: str = typer.Option("ort", "--runtime", help="What runs the .onnx models: ort (ONNX Runtime's CPU EP) "
                                "or openvino (OpenVINO's runtime, which runs Conv+activation fused in int8; without --profile/--fusion the INT8 model then gets the openvino profile, and without --recipe the mean-minmax recipe)."),
    targets: Optional[list[str]] = typer.Option(None, "--target", help="NPU target (configs/npu/ name or YAML) "
                                                "that lists its operators: which ops of the model it runs (ops.json, "
                                                "a report section), and, if it sets its arithmetic, a variant "
                                                "quantized under it. Repeat for several."),
):
    """The main job: export FP32 ONNX, calibrate, quantize to INT8, evaluate both, compare; writes a run folder."""

    names = [p.strip() for p in (profiles or "").split(",") if p.strip()]
    if both_fusions and not names:
        raise QbenchError("--both-fusions goes with --profiles, e.g. --profiles cpu,npu-symmetric --both-fusions.")
    run_dir = run_pipeline(weights=weights, data=data, out=out, imgsz=imgsz, batch=batch, threads=threads,
                           recipe=recipe, calib=calib_manifest, baseline=baseline, profile=profile,
                           fusion=fusion, profiles=names, fusions=["fused", "unfused"] if both_fusions else None,
                           progress=True, allow_scored_calib=allow_scored_calib, runtime=runtime, targets=targets)
    typer.echo((run_dir / "summary.md").read_text())
    typer.echo(f"run folder: {run_dir}")


@app.command()
def inspect(
    run_dir: Optional[Path] = typer.Argument(None, help="A `qbench run` folder (fp32.onnx, int8.onnx, run.json), or "
                                             "a `qbench qat` folder (its PTQ and QAT models, into ptq/ and qat/)."),
    fp32: Optional[Path] = typer.Option(None, "--fp32", help="FP32 .onnx (default: RUN_DIR/fp32.onnx, or "
                                        "the fp32-prepared.onnx next to an INT8 model whose recipe transforms the float graph)."),
    int8: Optional[Path] = typer.Option(None, "--int8", help="INT8 QDQ .onnx (default: RUN_DIR/int8.onnx)."),
    calib_manifest: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest (default: the run's)."),
    data: Optional[Path] = typer.Option(None, "--data", help="data.yaml; error is measured on its val split."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for layers.csv, leaky.csv, inspect.json "
                                                             "(default: RUN_DIR)."),
    images: int = typer.Option(128, help="Calibration images the statistics are collected on."),
    error_images: int = typer.Option(16, help="Val images the quantization error is measured on."),
    threads: Optional[int] = typer.Option(None),
    variants: bool = typer.Option(True, "--variants/--no-variants", help="Also the run's NPU-profile variants "
                                  "(profiles/*/int8.onnx), sharing the FP32 statistics pass."),
):
    """Per-layer activation statistics, quantization error (SQNR, cosine) and LeakyReLU / SiLU diagnostics."""

    r = inspect_run(run_dir, fp32=fp32, int8=int8, calib=calib_manifest, data=data, out=out, images=images,
                    error_images=error_images, threads=threads, variants=variants, progress=True)
    s = r["summary"]
    acts = ", ".join(f"{k} x{n}" + (f" ({u} requantized after their Conv)" if (u := {"LeakyRelu": s.get(
        "unfused_leaky_relus"), "SiLU": s.get("unfused_silus")}.get(k)) else "") for k, n in s["activations"].items())
    typer.echo(f"{s['quantized_tensors']} quantized tensors; activations: {acts or 'none'}; output SQNR "
               f"{s['output_sqnr_db']:.1f} dB, median per-tensor SQNR {s['median_isolated_sqnr_db']:.1f} dB")
    for row in r["leaky"][:5]:
        typer.echo(f"  LeakyReLU #{row['rank']} {row['layer']}: {row['sqnr_actual_db']:.1f} dB, harm "
                   f"{row['harm_db']:.1f} dB, remedy: {row['remedy']} (+{row['remedy_gain_db']:.1f} dB)"
                   .replace("+inf dB", "no 8-bit remedy reaches 15 dB"))
    for row in r["silu"][:5]:
        typer.echo(f"  SiLU #{row['rank']} {row['layer']}: {row['sqnr_actual_db']:.1f} dB, harm {row['harm_db']:.1f} "
                   f"dB, fused {row['sqnr_fused_db']:.1f} dB")
    for name, v in r["other_variants"].items():
        s = v["summary"]
        typer.echo(f"  variant {name}: output SQNR {s['output_sqnr_db']:.1f} dB, median per-tensor "
                   f"SQNR {s['median_isolated_sqnr_db']:.1f} dB ({v['out']})")
    where = r.get("out") or out or run_dir  # a QAT folder: the QAT model's files in qat/ (PTQ's: the variant line)
    files = ["layers.csv"] + [f for f, rows in (("leaky.csv", r["leaky"]), ("silu.csv", r["silu"])) if rows]
    typer.echo(f"wrote {where}/{', '.join(files)}, weights.csv, histograms.npz, inspect.json "
               f"({r['seconds']['total']:.1f} s)")


@app.command()
def qat(
    weights: Path = typer.Option(..., "--weights", help="Trained checkpoint (best.pt)."),
    data: Path = typer.Option(..., "--data", help="data.yaml: train split to fine-tune and calibrate, val to score."),
    out: Path = typer.Option(..., "--out", help="Run folder; re-run the same command to resume an interrupted run."),
    recipe: str = typer.Option("default", "--recipe", help="Recipe name in configs/recipes/ or a YAML path; its "
                                "calibrated ranges start the fake quantization (power-of-two profiles: "
                                "percentile-9999)."),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    fusion: Optional[str] = typer.Option(None, "--fusion", help=FUSION_HELP),
    calib_manifest: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest (default: sampled "
                                                  "from the train split)."),
    epochs: int = typer.Option(3),
    imgsz: Optional[int] = typer.Option(None, help="Default: the size the model was trained at."),
    batch: int = typer.Option(16),
    lr0: float = typer.Option(1e-4),
    device: str = typer.Option("cpu", help="'cpu' or a CUDA device such as '0'."),
    workers: int = typer.Option(2),
    u8: bool = typer.Option(True, "--u8/--no-u8", help="Write int8 activations as uint8 with zero point +128 (the "
                            "same numbers; fast x86 kernels)."),
    learn_ranges: bool = typer.Option(False, "--learn-ranges/--freeze-ranges", help="Learn each activation scale "
                                      "(from its PTQ value; powers of two under pow2 profiles) or keep the PTQ "
                                      "scales."),
    range_lr: float = typer.Option(1e-2, help="Learning rate of the log2 activation scales (--learn-ranges)."),
    seed: int = typer.Option(0, help="Training seed (augmentation, data order); the run is deterministic for a seed."),
    distill: float = typer.Option(0.0, help="Weight of a distillation loss from the FP32 model (its class scores "
                                  "and box distributions) added to the detection loss; 0 = off."),
    allow_scored_calib: bool = typer.Option(False, "--allow-scored-calib", help="Accept a --calib manifest that "
                                            "holds images of the scored split (flatters INT8; recorded)."),
):
    """QAT fine-tuning with fake quantization matching a PTQ recipe/profile; exports a QDQ INT8 ONNX and scores
    FP32 / PTQ / QAT in one table (qat.json)."""
    from .qatrain import qat as run_qat

    r = run_qat(weights, data, out, recipe=recipe, profile=profile, fusion=fusion, calib=calib_manifest,
                epochs=epochs, imgsz=imgsz, batch=batch, lr0=lr0, device=device, workers=workers, u8_activations=u8,
                learn_ranges=learn_ranges, range_lr=range_lr, distill=distill, progress=True,
                allow_scored_calib=allow_scored_calib, **({"seed": seed} if seed else {}))
    for name, row in r["compare"]["table"].items():
        typer.echo(f"  {name}: mAP50-95 {row['mAP50-95']:.4f} ({row['delta_mAP50-95']:+.4f}), "
                   f"batch-1 {row['batch1_median_ms']:.1f} ms ({row['speedup_batch1']:.2f}x)")
    c = r["compare"]
    if c.get("recovered_fraction") is not None:
        lo, hi = c["qat_minus_ptq_ci95"]
        typer.echo(f"QAT gives back {100 * c['recovered_fraction']:.0f}% of the PTQ loss; QAT - PTQ "
                   f"{c['qat_minus_ptq']:+.4f} (95% CI over the images [{lo:+.4f}, {hi:+.4f}])")
    a = r["activation_ranges"]
    if a["learned_tensors"]:
        typer.echo(f"learned activation scales: {a['changed_from_ptq']} of {a['learned_tensors']} moved from their "
                   f"PTQ value")
    k, m = r["kernels"], r["onnx_vs_torch"]
    typer.echo(f"{k['QLinearConv']} of {k['quantized_convs']} quantized convs run as QLinearConv; QAT ONNX vs "
               f"PyTorch fake-quant: {m['ort_optimized']['sqnr_db']:.1f} dB SQNR"
               + (f" (ORT's fused kernels vs its own QDQ simulation: {m['ort_self']['sqnr_db']:.1f} dB)"
                  if "ort_self" in m else ""))
    typer.echo(f"wrote {out}/qat.json, summary.md, report.html")


@app.command()
def ops(
    models: list[str] = typer.Argument(..., help="Models: .onnx, .pt, or model YAMLs (a configs/models name, an "
                                       "ultralytics one like yolo11n.yaml, or a path)."),
    targets: Optional[list[str]] = typer.Option(None, "--target", help="Target (configs/npu/ name or YAML) whose "
                                                "operator list to check against; repeat; default: every shipped "
                                                "target that lists operators."),
    expect_activation: Optional[str] = typer.Option(None, "--expect-activation", help="Check that every activation "
                                                    "is this one, e.g. 'LeakyReLU(0.1)', 'ReLU', 'SiLU'; exits 1 "
                                                    "listing each offender."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for ops.json and ops.md."),
    imgsz: Optional[int] = typer.Option(None, help="Export size for .pt/YAML models (default: trained size / 640)."),
):
    """Which operators of a model each NPU target runs, what falls back to the CPU and why, how often the graph
    crosses between them; and (--expect-activation) the activation verifier."""
    r = ops_report(models, targets, out, expect_activation, imgsz, command=command_line())
    typer.echo(ops_md(r))
    if out:
        typer.echo(f"wrote {out}/ops.json, ops.md")
    bad = [m for m in r["models"] if m.get("offenders")]
    if bad:
        for m in bad:
            _say(f"{m['model']}: {len(m['offenders'])} activations are not {expect_activation}:")
            for o in m["offenders"]:
                _say(f"  {o['layer']}: {o['type']}" + (f"({o['param']:g})" if o["param"] is not None else ""))
        raise typer.Exit(1)


@app.command()
def sensitivity(
    fp32: Path = typer.Argument(..., help="FP32 .onnx."),
    int8: Path = typer.Argument(..., help="INT8 QDQ .onnx quantized from it (`qbench quantize`)."),
    calib_manifest: Path = typer.Option(..., "--calib", help="Calibration manifest: the proxy images are its first "
                                        "--images."),
    out: Path = typer.Option(..., "--out", help="Folder for sensitivity.json and sensitivity.csv."),
    data: Optional[Path] = typer.Option(None, "--data", help="data.yaml: the top-K layers are measured by mAP50-95 "
                                        "on its val split (without it: proxy only)."),
    images: int = typer.Option(8, help="Proxy images (calibration images, never the scored split)."),
    top_k: int = typer.Option(10, "--top-k", help="Layers measured by mAP (0: none)."),
    threads: Optional[int] = typer.Option(None),
):
    """Per-layer sensitivity: the damage of quantizing each conv alone and the recovery of keeping it alone in
    FP32, by an output-error proxy for every layer and by mAP for the top-K."""

    if images < 1:
        raise QbenchError(f"--images {images} must be at least 1.")
    _, paths = load_manifest(calib_manifest, verify=True)
    r = layer_sensitivity(fp32, int8, paths[:images], data, top_k=top_k, settings=EvalSettings(threads=threads),
                          out=out, progress=True, threads=threads)
    p = r["proxy"]
    typer.echo(f"{p['layers']} quantized convs; INT8 output error {p['int8_db']:.1f} dB on {len(p['images'])} "
               f"images ({p['forward_passes']} forward passes, {p['seconds']:.0f} s)")
    for row in r["layers"][:10]:
        extra = (f", mAP recovery {100 * row['map_recovery']:+.2f} / damage {100 * row['map_damage']:+.2f} points"
                 if row["map_recovery"] is not None else "")
        typer.echo(f"  #{row['rank']} {row['module']}: proxy recovery {row['proxy_recovery_db']:+.2f} dB, "
                   f"alone {row['proxy_damage_db']:.1f} dB{extra}")
    if r["map"]:
        rc = r["map"]["rank_correlation"]
        typer.echo(f"rank correlation proxy vs mAP over the top {r['map']['top_k']}: recovery {rc['recovery']}, "
                   f"damage {rc['damage']} ({r['map']['evaluations']} evaluations, {r['map']['seconds']:.0f} s)")
    typer.echo(f"wrote {out}/sensitivity.json, sensitivity.csv")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more `qbench run` folders (several: side by side)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for summary.md and report.html "
                                                             "(default: the run folder; needed for several runs)."),
):
    """summary.md and a self-contained report.html: FP32 vs INT8, per-layer SQNR, worst ranges, LeakyReLU ranking."""

    page = write_report(run_dirs, out)
    typer.echo(f"wrote {page.with_name('summary.md')} and {page}")


@bench_app.command("eval")
def bench_eval(
    model: Path = typer.Argument(..., help="FP32 .onnx, or a .pt exported on the fly (at --imgsz)."),
    data: Path = typer.Option(..., "--data"),
    imgsz: Optional[int] = typer.Option(None, help="Export size for a .pt (default: its training size)."),
    out: Path = typer.Option(..., "--out", help="Folder for bench.json and summary.md, e.g. results/bench/eval-gtsdb4."),
    repeats: int = typer.Option(2, help="Timed runs of each evaluator, interleaved."),
    batch: int = typer.Option(16),
):
    """qbench eval vs ultralytics' YOLO(onnx).val on the same ONNX and data: time and metrics side by side."""

    summary = run_bench(model, data, out, repeats=repeats, batch=batch, imgsz=imgsz, argv=sys.argv)
    typer.echo(summary)


@bench_app.command("sweep")
def bench_sweep(
    model: Path = typer.Argument(..., help="FP32 .onnx, or a .pt exported on the fly (at --imgsz)."),
    data: Path = typer.Option(..., "--data"),
    calib_manifest: Path = typer.Option(..., "--calib", help="Calibration manifest with at least max(--sizes) images."),
    out: Path = typer.Option(..., "--out", help="Folder for sweep.json and summary.md."),
    methods: str = typer.Option("minmax,entropy,percentile,distribution", help="Comma-separated methods."),
    sizes: str = typer.Option("32,64,128,256,512", help="Comma-separated calibration sizes."),
    recipe: str = typer.Option("default", help="Base recipe; method and calib_size are swept."),
    imgsz: Optional[int] = typer.Option(None),
):
    """INT8 mAP over calibration method x calibration size, in one table."""

    typer.echo(run_sweep(model, data, calib_manifest, out, [m.strip() for m in methods.split(",") if m.strip()],
                         _sizes(sizes), recipe=recipe, imgsz=imgsz, argv=sys.argv, progress=True))


@bench_app.command("calib-memory")
def bench_calib_memory(
    model: Path = typer.Argument(..., help="FP32 .onnx, or a .pt exported on the fly (at --imgsz)."),
    calib_manifest: Path = typer.Option(..., "--calib", help="Calibration manifest with at least max(--sizes) images."),
    out: Path = typer.Option(..., "--out", help="Folder for memory.json and summary.md."),
    sizes: str = typer.Option("64,512", help="Comma-separated calibration sizes."),
    recipe: str = typer.Option("default"),
    imgsz: Optional[int] = typer.Option(None),
):
    """Peak memory of calibration per calibration size (each in a fresh process)."""

    typer.echo(run_memory(model, calib_manifest, out, _sizes(sizes), recipe=recipe, imgsz=imgsz, argv=sys.argv))


@bench_app.command("inspect")
def bench_inspect(
    fp32: Path = typer.Argument(..., help="FP32 .onnx."),
    int8: Path = typer.Argument(..., help="INT8 QDQ .onnx made from it."),
    calib_manifest: Path = typer.Option(..., "--calib", help="Calibration manifest (statistics images)."),
    data: Path = typer.Option(..., "--data", help="data.yaml: its train split is evaluated, its val split scored."),
    out: Path = typer.Option(..., "--out", help="Folder for bench.json and summary.md."),
    images: int = typer.Option(128, help="Images for the statistics and for the FP32 evaluation pass."),
    error_images: int = typer.Option(16),
    memory_sizes: str = typer.Option("64,512", help="Peak RSS of inspect at these image counts ('' to skip)."),
):
    """Time of `qbench inspect` against one FP32 evaluation pass over as many images; peak memory per size."""
    typer.echo(benchmarks.bench_inspect(fp32, int8, calib_manifest, data, out, images=images, error_images=error_images,
                         memory_sizes=_sizes(memory_sizes) if memory_sizes.strip() else None, argv=sys.argv,
                         progress=True))


@bench_app.command("engines")
def bench_engines(
    weights: Path = typer.Argument(..., help="Trained best.pt (INC quantizes the PyTorch model)."),
    data: Path = typer.Option(..., "--data", help="data.yaml: INC tunes on its val split; both are scored on it."),
    calib_manifest: Path = typer.Option(..., "--calib", help="Calibration manifest, shared by both engines."),
    out: Path = typer.Option(..., "--out", help="Folder for engines.json and summary.md."),
    recipe: str = typer.Option("default", help="Recipe of the ONNX Runtime engine."),
    tolerable_loss: float = typer.Option(0.01, help="INC's relative mAP50-95 loss tolerated by its tuning."),
    max_trials: int = typer.Option(3, help="INC tuning trials at most."),
    eval_images: Optional[int] = typer.Option(None, help="Val images INC scores each trial on (default: all)."),
):
    """ONNX Runtime vs Intel Neural Compressor on one model: mAP, int8 convs in the optimized graph, latency."""
    typer.echo(benchmarks.bench_engines(weights, data, calib_manifest, out, recipe=recipe, tolerable_loss=tolerable_loss,
                         max_trials=max_trials, eval_images=eval_images, argv=sys.argv, progress=True))


@bench_app.command("peers")
def bench_peers_cmd(
    weights: Path = typer.Argument(..., help="Trained checkpoint (best.pt)."),
    data: Path = typer.Option(..., "--data", help="data.yaml: its val split is scored."),
    calib_manifest: Path = typer.Option(..., "--calib", help="Calibration manifest (its first 128 images, for every "
                                        "tool)."),
    out: Path = typer.Option(..., "--out", help="Folder for peers.json and peers.md, e.g. results/bench/peers-NAME."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="A second data.yaml scored too (e.g. from "
                                           "`qbench data heldout`: more images, none used for calibration)."),
    imgsz: Optional[int] = typer.Option(None, help="Default: the size the model was trained at."),
    threads: Optional[int] = typer.Option(None),
):
    """qbench's INT8 models beside NNCF's, ONNX Runtime's quantize_static and ultralytics' export, each scored through
    the runtime that runs it (ONNX Runtime or OpenVINO), speed against the FP32 model on ONNX Runtime."""
    typer.echo(bench_peers(weights, data, calib_manifest, out, heldout=heldout, imgsz=imgsz, threads=threads,
                           argv=sys.argv, progress=True))


def main() -> None:
    """Console entry point. Usage errors: typer's message, exit 2; QbenchError: one line, exit 2; Ctrl-C and
    SIGTERM: 'interrupted', exit 130 / 143, after every temporary folder and staged output is removed."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # unwinds like Ctrl-C: context managers and finally blocks clean up

    signal.signal(signal.SIGTERM, terminate)
    sweep_scratch()  # what killed qbench processes (SIGKILL) left in the temp folder
    try:
        app()
    except QbenchError as e:
        _say(f"error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    except SystemExit as e:  # typer turns Ctrl-C into a silent exit 130
        if e.code in (130, 128 + signal.SIGTERM):
            _say("interrupted" if e.code == 130 else "terminated")
        raise


if __name__ == "__main__":
    main()
