"""`resunetpp data ...`: check, split, download, prepare and show datasets (thin layer over resunetpp.data)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from resunetpp.cli.common import ExitCode, choices, errors
from resunetpp.data import SegmentationFolder, check_dataset, leaks, make_split, prepare_cache, save_split
from resunetpp.data.augment import PRESETS
from resunetpp.data.cache import read_manifest
from resunetpp.data.download import download_dataset
from resunetpp.data.folder import hash_folder
from resunetpp.data.layouts import LAYOUTS
from resunetpp.data.show import show_dataset
from resunetpp.io import MASK_VALUES

Layout = choices("Layout", LAYOUTS)
Preset = choices("Preset", PRESETS)
MaskValues = choices("MaskValues", MASK_VALUES)
GroupBy = choices("GroupBy", ("sequences", "near-duplicates"))

data_app = typer.Typer(help="Datasets: integrity check, splits, download, prepared cache, pictures.",
                       no_args_is_help=True)

LAYOUT_HELP = "Dataset layout: kvasir-seg, cvc-clinicdb, folder or cache (default: detected from the folder)."


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@contextmanager
def _friendly_errors():
    """Failures become one 'error:' line with the exit code of `common.exit_code` (the dataset layer's plain
    ValueErrors are about the data: bad input, 3); warnings print as 'warning:' lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            with errors(plain=ExitCode.BAD_INPUT):
                yield
        finally:
            _flush(caught)


def _flush(caught) -> None:
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    caught.clear()


def _v(choice):
    return choice.value if choice is not None else None


def _print_report(report) -> None:
    console = Console(width=120)
    console.print(report.headline(), style="bold green" if report.ok else "bold red", markup=False,
                  soft_wrap=True)
    console.print(report.table())
    for title, items, style in (("unusable", report.problems, "red"), ("warnings", report.warnings, "yellow")):
        if items:
            console.print(f"{title}:", style=style)
            for p in items[:50]:
                console.print(f"  {p.path}: {p.what}", markup=False, highlight=False, soft_wrap=True)
            if len(items) > 50:
                console.print(f"  ... and {len(items) - 50} more")


@data_app.command("check")
def check(root: Path = typer.Argument(..., help="Dataset folder (or prepared cache)."),
          layout: Layout | None = typer.Option(None, "--layout", help=LAYOUT_HELP),
          quick: bool = typer.Option(False, "--quick", help="Read file headers only (no decoding)."),
          mask_values: MaskValues = typer.Option(MaskValues("auto"), "--mask-values",
                                                 help="How masks mark the polyp: 255 (grey > 127), 01 (label "
                                                 "images, value 1) or auto (01 when a mask's largest value is 1).")
          , split: Path | None = typer.Option(None, "--split", help="Split JSON to audit for leaks (default: the "
                                              "committed split of a known dataset). Needs the full check.")
          ) -> None:
    """Check a dataset's pairs; exits 1 when a pair is unusable (or there are none). The full check also warns
    when the split leaks: near-duplicate images, or frames of one video sequence, in different parts."""
    with _friendly_errors():
        report = check_dataset(root, layout=_v(layout), deep=not quick, progress=True, mask_values=mask_values.value,
                               split=split if split is not None else "auto")
    _print_report(report)
    if not report.ok:
        raise typer.Exit(ExitCode.PARTIAL)


@data_app.command("split")
def split(root: Path = typer.Argument(..., help="Dataset folder (or prepared cache)."),
          out: Path = typer.Option(..., "--out", help="Split JSON to write."),
          seed: int = typer.Option(0, "--seed", min=0),
          fractions: str = typer.Option("0.8,0.1,0.1", "--fractions", help="train,val,test fractions."),
          layout: Layout | None = typer.Option(None, "--layout", help=LAYOUT_HELP),
          skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unusable pairs out instead of failing."),
          group_by: GroupBy | None = typer.Option(None, "--group-by", help="Keep groups whole in one part: "
                                                  "sequences (the committed video sequences; CVC-ClinicDB) or "
                                                  "near-duplicates (perceptual hash of every image)."),
          sequences: Path | None = typer.Option(None, "--sequences", help="Sequence JSON for --group-by sequences "
                                                "(default: the committed file of a known dataset).")
          ) -> None:
    """Write a deterministic train/val/test split of the dataset's ids (naturally sorted, then shuffled by seed);
    with --group-by, no video sequence or near-duplicate group is split across parts."""
    with _friendly_errors():
        try:
            fr = [float(x) for x in fractions.split(",")]
        except ValueError:
            raise ValueError(f"--fractions {fractions!r}: expected three numbers like 0.8,0.1,0.1") from None
        ds = SegmentationFolder(root, layout=_v(layout), skip_bad=skip_bad)
        how = ""
        if group_by is None:
            if sequences is not None:
                raise ValueError("--sequences needs --group-by sequences")
            parts = make_split(ds.ids, seed=seed, fractions=fr)
        else:
            make_split(ds.ids, seed=seed, fractions=fr)  # validates the fractions
            if group_by.value == "sequences":
                groups = leaks.load_sequences(sequences) if sequences is not None else leaks.sequences(ds.name)
                missing = sorted(set(ds.ids) - {i for g in groups for i in g})
                if missing:
                    raise ValueError(f"{sequences or leaks.sequences_path(ds.name)}: {len(missing)} id(s) of {ds.root} "
                                     f"in no sequence, e.g. {', '.join(missing[:5])}")
            else:
                groups = leaks.near_duplicate_groups(hash_folder(ds.root, ids=ds.ids, layout=_v(layout),
                                                                 progress=True))
            parts = leaks.grouped_split(ds.ids, groups, seed=seed, fractions=fr)
            multi = [g for g in groups if len(g) > 1]
            how = f", grouped by {group_by.value} ({len(multi)} groups of 2+ images kept whole)"
        save_split(parts, out, dataset=ds.name, seed=seed)
    typer.echo(f"{out}: {ds.name}, seed {seed}{how}: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))


@data_app.command("download")
def download(name: str = typer.Argument(..., help="kvasir-seg or cvc-clinicdb."),
             to: Path = typer.Option(..., "--to", help="Folder to download and unpack into."),
             url: str = typer.Option(None, "--url", help="Download from this URL instead of the official one."),
             archive: Path = typer.Option(None, "--archive", help="Use this local archive (no download)."),
             sha256: str = typer.Option(None, "--sha256", help="Expected SHA-256 of the archive.")) -> None:
    """Download (resumable), verify, safely unpack and check a dataset."""
    with _friendly_errors():
        root, report = download_dataset(name, to, url=url, archive=archive, sha256=sha256)
    _print_report(report)
    typer.echo(f"dataset ready at {root}" if report.ok else f"{root}: unpacked, but the check failed")
    if not report.ok:
        raise typer.Exit(ExitCode.PARTIAL)


@data_app.command("prepare")
def prepare(root: Path = typer.Argument(..., help="Dataset folder."),
            out: Path = typer.Option(..., "--out", help="Cache folder to write."),
            size: str = typer.Option("256", "--size", help="Side (256) or HxW (288x384)."),
            layout: Layout | None = typer.Option(None, "--layout", help=LAYOUT_HELP),
            skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unusable pairs out instead of failing."),
            quality: int | None = typer.Option(None, "--quality", min=1, max=100,
                                               help="Store JPEG images at this quality (lossy, smaller) instead of "
                                               "the default exact lossless WebP.")) -> None:
    """Write an exact resized copy (lossless WebP images, PNG masks, manifest, split) that loads fast."""
    with _friendly_errors():
        out = prepare_cache(root, out, size=size, layout=_v(layout), skip_bad=skip_bad, quality=quality)
    manifest = read_manifest(out)
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    h, w = manifest["size"]
    typer.echo(f"{out}: {manifest['dataset']}, {len(manifest['ids'])} pairs at {h}x{w} (HxW), "
               f"{nbytes / 1e6:.1f} MB; split: {manifest['split']}")


@data_app.command("show")
def show(root: Path = typer.Argument(..., help="Dataset folder (or prepared cache)."),
         out: Path = typer.Option(Path("grid.png"), "--out", help="Picture to write (PNG)."),
         n: int = typer.Option(16, "--n", min=1, help="Number of pairs."),
         augment: Preset | None = typer.Option(None, "--augment", help="Also show each pair after this preset."),
         seed: int = typer.Option(0, "--seed", min=0, help="Picks the pairs and the augmentation."),
         size: str = typer.Option("256", "--size", help="Side (256) or HxW."),
         layout: Layout | None = typer.Option(None, "--layout", help=LAYOUT_HELP),
         skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unusable pairs out instead of failing.")
         ) -> None:
    """Draw pairs with their mask outlines (and their augmented versions)."""
    with _friendly_errors():
        path = show_dataset(root, out, n=n, augment=_v(augment), seed=seed, size=size, layout=_v(layout),
                            skip_bad=skip_bad)
    typer.echo(f"wrote {path}")
