"""Small verbs: list recipes, fetch downloads, print the recipe reference."""
from __future__ import annotations

import yaml

from pipeline.engine.settings import Settings
from pipeline.generic.downloads import fetch_all
from pipeline.recipe.load import available, normal_name, target_aliases, target_names
from pipeline.registry import load_recipe


def list_recipes(settings: Settings) -> int:
    print("recipes (recipe, target, scheme, description):")
    for name in available(settings.recipes_dir):
        r = load_recipe(name, settings)
        print(f"  {name:32} {r.target.name:8} {r.scheme.name:16} {r.spec.description}")
    targets = settings.recipes_dir / "targets"
    fits = target_aliases(targets, settings)
    print("targets (name, runtime: other names a recipe may use; * = fits several targets, refused):")
    for name, words in target_names(targets, settings).items():
        runtime = yaml.safe_load((targets / f"{name}.yaml").read_text()).get("runtime", "?")
        shown = [w + ("*" if len(fits[normal_name(w)]) > 1 else "") for w in words]
        print(f"  {name:10} {runtime:10} {', '.join(shown) or '-'}")
    return 0


def fetch() -> int:
    for path in fetch_all():
        print(f"fetched: {path}")
    return 0


def add_parser(sub) -> None:
    sub.add_parser("list", help="list recipes").set_defaults(func=lambda a, s: list_recipes(s))
    sub.add_parser("fetch", help="download the embedded models and the llama.cpp sdist (setup.sh runs it)") \
        .set_defaults(func=lambda a, s: fetch())
    from pipeline.cli.docs import add_parser as add_docs

    add_docs(sub)
