"""Prompt template sets for zero-shot classification, by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmcl.errors import ConfigError
from mmcl.prompts import DIGIT_TEMPLATES

Template = str | Callable[[str], str]


def template_set(name_or_list: str | Sequence[str]) -> list[Template]:
    """``openai`` (CLIP's 80 ImageNet prompts), ``simple``, ``mnist``, ``digits`` (the captions mmcl-prep
    writes for its digits), or a list of strings with ``{}`` (or CLIP_benchmark's ``{c}``) for the class name."""
    if not isinstance(name_or_list, str):
        templates = list(name_or_list)
        if not templates or not all("{}" in t or "{c}" in t for t in templates):
            raise ConfigError("templates: each custom template needs a '{}' (or '{c}') where the class name goes")
        return templates
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets: dict[str, list[Template]] = {
        "openai": list(OPENAI_IMAGENET_TEMPLATES),
        "simple": list(SIMPLE_IMAGENET_TEMPLATES),
        "mnist": ['a photo of the number: "{}".'],  # CLIP's own prompt for MNIST
        "digits": list(DIGIT_TEMPLATES),
    }
    if name_or_list not in sets:
        raise ConfigError(f"templates: unknown set {name_or_list!r}; use one of {', '.join(sets)} or a list")
    return sets[name_or_list]


def fill(template: Template, class_name: str) -> str:
    """One prompt: a format string (``{}`` or CLIP_benchmark's ``{c}`` for the class name, so its
    ``zeroshot_classification_templates.txt`` reads as it is) or a callable applied to the class name."""
    return template(class_name) if callable(template) else template.format(class_name, c=class_name)
