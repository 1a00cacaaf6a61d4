"""Build what spark-submit needs into ``dist/`` (``make dist``).

    .venv/bin/python scripts/dist.py            # wheel + zip + jobs + conf
    .venv/bin/python scripts/dist.py --no-wheel # skip the wheel (no build backend download)
    .venv/bin/python scripts/dist.py --check    # also import citylake from the zip alone

Builds, replacing earlier builds (re-running gives the same files):

* ``dist/citylake-<version>-py3-none-any.whl``: the package, for ``pip install`` on a
  gateway host or in an executor image. Built with ``pip wheel --no-deps`` from a staged
  copy of the sources, so the build writes nothing into ``lib/`` (no egg-info, no build/).
* ``dist/citylake.zip``: the ``citylake`` package for ``spark-submit --py-files``, the
  same files as the wheel: every module plus the ``schemas/*.yaml`` data, stored as real
  files (``lib/citylake/schemas`` is a symlink to ``schemas/``). Entries are sorted and
  time-stamped 1980-01-01, so an unchanged source gives a byte-identical zip.
* ``dist/jobs/*.py``: the spark-submit entry points.
* ``dist/conf/*.yaml`` + ``log4j2.properties``: the configuration, for ``--conf-dir
  dist/conf`` (client mode) or ``--files`` (cluster deploy mode on YARN/Kubernetes).

The wheel needs the build backend from ``pyproject.toml`` (setuptools>=77), which pip
fetches from PyPI (or its cache) into an isolated build environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "citylake"
#: Same rule as ``[tool.setuptools.package-data]`` in pyproject.toml.
PACKAGE_DATA = ("schemas/*.yaml",)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info")


def package_files(package_dir: Path) -> list[tuple[Path, str]]:
    """(file, name in archive) for every module and data file of the package, sorted.

    Follows symlinks (``schemas`` is one). Sub-packages are folders with ``__init__.py``,
    as setuptools' ``packages.find`` sees them.
    """
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(package_dir, followlinks=True):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        is_package = (here / "__init__.py").is_file()
        for name in files:
            if is_package and name.endswith(".py"):
                found[(here / name).relative_to(package_dir.parent).as_posix()] = here / name
    for pattern in PACKAGE_DATA:
        for path in package_dir.glob(pattern):
            if path.is_file():
                found[path.relative_to(package_dir.parent).as_posix()] = path
    return sorted(((path, arc) for arc, path in found.items()), key=lambda item: item[1])


def write_zip(entries: list[tuple[Path, str]], target: Path) -> None:
    """A deterministic zip: sorted entries, fixed time stamps and modes; written atomically."""
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, arc in entries:
            info = zipfile.ZipInfo(arc, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    os.replace(tmp, target)


def stage_sources(stage: Path) -> Path:
    """Copy what the wheel build reads into ``stage`` (symlinks resolved); return it."""
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, stage / name)
    shutil.copytree(ROOT / "lib", stage / "lib", symlinks=False, ignore=IGNORE)
    return stage


def build_wheel(stage: Path, out: Path) -> Path:
    wheel_dir = stage.parent / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--wheel-dir", str(wheel_dir), str(stage)]
    # A fixed SOURCE_DATE_EPOCH makes the wheel's time stamps, hence its bytes, reproducible.
    env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315619200")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(
            "dist: building the wheel failed (pip needs setuptools>=77 from PyPI or its cache); "
            "use --no-wheel to build only the zip, jobs and conf"
        )
    wheels = sorted(wheel_dir.glob(f"{PACKAGE}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"dist: expected one {PACKAGE} wheel, pip produced {wheels}")
    for old in out.glob(f"{PACKAGE}-*.whl"):
        old.unlink()
    target = out / wheels[0].name
    shutil.copy2(wheels[0], target)
    return target


def copy_files(files: list[Path], target_dir: Path) -> list[Path]:
    """Replace ``target_dir`` with copies of ``files``."""
    if target_dir.exists():
        shutil.rmtree(target_dir)
    target_dir.mkdir(parents=True)
    copied = []
    for src in sorted(files):
        shutil.copy2(src, target_dir / src.name)
        copied.append(target_dir / src.name)
    return copied


def check_zip(zip_path: Path) -> str:
    """Import citylake from the zip alone (python -S: the venv's editable install is not
    seen) and read the packaged schemas; return what it printed."""
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import citylake, citylake.cli\n"
        "from citylake.catalogue import load_catalogue\n"
        "cat = load_catalogue()\n"
        "assert citylake.__file__.startswith(%r), citylake.__file__\n"
        "print(f'{citylake.__file__}: {len(cat.metrics)} metrics, {len(cat.tables)} tables')\n"
    ) % str(zip_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CITYLAKE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(zip_path), site])
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                            env=env, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"dist: citylake cannot be used from {zip_path} alone (see above)")
    return result.stdout.strip()


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build dist/ for spark-submit: wheel, "
                                     "citylake.zip (--py-files), jobs/, conf/.")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--no-wheel", action="store_true", help="skip the wheel")
    parser.add_argument("--check", action="store_true",
                        help="import citylake and load its schemas from the zip alone")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="citylake-dist-") as tmp:
        stage = Path(tmp) / "src"
        stage.mkdir()
        stage_sources(stage)
        entries = package_files(stage / "lib" / PACKAGE)
        if not any(arc.startswith(f"{PACKAGE}/schemas/") for _, arc in entries):
            raise SystemExit(f"dist: no schema files found under lib/{PACKAGE}/schemas")
        zip_path = out / f"{PACKAGE}.zip"
        write_zip(entries, zip_path)
        wheel = None if args.no_wheel else build_wheel(stage, out)

    if wheel is not None:
        with zipfile.ZipFile(wheel) as wf:
            in_wheel = sorted(n for n in wf.namelist() if n.startswith(f"{PACKAGE}/"))
        in_zip = [arc for _, arc in entries]
        if in_wheel != in_zip:
            raise SystemExit(f"dist: wheel and zip differ: only in wheel {sorted(set(in_wheel) - set(in_zip))}, "
                             f"only in zip {sorted(set(in_zip) - set(in_wheel))}")

    jobs = copy_files(list((ROOT / "jobs").glob("*.py")), out / "jobs")
    conf = copy_files(list((ROOT / "conf").glob("*.yaml")) + [ROOT / "conf" / "log4j2.properties"],
                      out / "conf")

    rel = lambda p: os.path.relpath(p, Path.cwd())  # noqa: E731
    n_schemas = sum(1 for _, arc in entries if arc.startswith(f"{PACKAGE}/schemas/"))
    print(f"built in {rel(out)}/:")
    if wheel is not None:
        print(f"  {rel(wheel):<40} {_size(wheel):>10}  pip install (same files as the zip)")
    print(f"  {rel(zip_path):<40} {_size(zip_path):>10}  --py-files: {len(entries)} files "
          f"({len(entries) - n_schemas} modules, {n_schemas} schemas/*.yaml)")
    print(f"  {rel(out / 'jobs') + '/':<40} {len(jobs):>6} files  {' '.join(p.name for p in jobs)}")
    print(f"  {rel(out / 'conf') + '/':<40} {len(conf):>6} files  {' '.join(p.name for p in conf)}")
    if args.check:
        print(f"check: {check_zip(zip_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
