"""bundle: `to_device/` with every shipped stage output, a README, `manifest.json`
(sha256 and size of every file, the output digest of every stage it packs, the tools that wrote
the tarball) and a deterministic
`<recipe>.tar.gz` (byte-identical when rebuilt from an empty store)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.materialize import link_tree
from pipeline.engine.stage import Stage, StageContext, Strict, node_id, recipe_nodes
from pipeline.engine.store import differs_from_manifest
from pipeline.engine.templating import TEMPLATES

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

README_TEMPLATE = "bundle/README.md.j2"
DEFAULT_EPOCH = 946684800  # 2000-01-01T00:00:00Z


class BundleParams(Strict):
    source_date_epoch: int | None = Field(
        None, ge=0, description="mtime of every tar entry; default: env SOURCE_DATE_EPOCH, else 2000-01-01."
    )
    compress_level: int = Field(1, ge=0, le=9, description="gzip level of the tarball (0 = store).")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Bundle(Stage):
    """The device bundle and its tarball."""

    name = "bundle"
    version = 4  # 3: stages' unshipped files (timings) left out; 4: names output digests, not action keys
    Params = BundleParams
    per_recipe = True
    tools = ("python", "zlib")

    @classmethod
    def shipped(cls, recipe: Recipe) -> dict[str, str]:
        """{node id: place in to_device/} of every stage output the bundle carries."""
        return {node_id(c.name, v): place for c, v in recipe_nodes(recipe)
                if c is not cls and (place := c.ships(recipe, v)) is not None}

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str = "") -> list[str]:
        return sorted(cls.shipped(recipe))

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        own = recipe.stage_params(cls.name)
        if own["source_date_epoch"] is None:
            own["source_date_epoch"] = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
        return {
            **own,
            "description": recipe.spec.description,
            "model_name": recipe.model.name,
            "target": recipe.target.model_dump(mode="json"),
            "scheme": recipe.scheme.model_dump(mode="json"),
            "places": cls.shipped(recipe),
        }

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Path]:
        return {"readme_template": TEMPLATES / README_TEMPLATE}

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        to_device = ctx.out / "to_device"
        to_device.mkdir()
        for stage, src in sorted(ctx.inputs.items()):
            # what ships must be what the entry's manifest says, whatever happened to the store since
            if bad := differs_from_manifest(src):
                raise KilnError(f"bundle: {stage}'s entry does not match its manifest ({', '.join(bad[:5])}); "
                                "run `doit verify` (quarantines it), then build again")
            place = p["places"][stage]
            try:
                method = link_tree(src, to_device / place, ("reflink", "hardlink", "copy"))
            except FileExistsError as e:
                clash = Path(e.filename).relative_to(to_device)
                raise KilnError(f"bundle: {stage} ships {clash}, which another stage put there already; "
                                "two stages must not ship the same file") from None
            ctx.log.info(f"adding {stage} as {place}/ ({method})")
        from pipeline.engine.templating import render

        readme = render(README_TEMPLATE, recipe=ctx.recipe_name, places=p["places"],
                        outputs=ctx.input_outputs, **{k: p[k] for k in ("description", "model_name", "target", "scheme")})
        # Shipped files are hardlinks into the store: never write through one.
        # A stage that ships its own README (the board's instructions) keeps it.
        if not (to_device / "README.md").exists():
            (to_device / "README.md").write_text(readme)
        files = {
            f.relative_to(to_device).as_posix(): {"sha256": sha256_file(f), "size": f.stat().st_size}
            for f in sorted(to_device.rglob("*")) if f.is_file()
        }
        manifest = {"recipe": ctx.recipe_name, "stage_outputs": ctx.input_outputs,
                    "tools": ctx.tools, "files": files}  # the tar's; each stage's tools are in its action record
        (to_device / "manifest.json").unlink(missing_ok=True)
        (to_device / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        from pipeline.engine.tarball import write_tarball

        tar = ctx.out / f"{ctx.recipe_name}.tar.gz"
        ctx.log.info(f"writing {tar.name} (gzip level {p['compress_level']})")
        write_tarball(to_device, tar, arcroot=ctx.recipe_name, mtime=p["source_date_epoch"],
                      compress_level=p["compress_level"])
        ctx.log.info(f"bundle: {len(files)} files, tarball {tar.stat().st_size / 1e6:.1f} MB")
