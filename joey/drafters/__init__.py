"""Drafters propose tokens; the target verifies them (joey.verify). See base.Drafter."""

from joey.drafters.base import Drafter, Proposal
from joey.drafters.draft_model import DraftModelDrafter
from joey.drafters.jakiro import JakiroDraft, JakiroDrafter
from joey.drafters.kangaroo import KangarooDraft, KangarooDrafter
from joey.drafters.prompt_lookup import PromptLookupDrafter

__all__ = [
    "DraftModelDrafter", "Drafter", "JakiroDraft", "JakiroDrafter", "KangarooDraft", "KangarooDrafter",
    "PromptLookupDrafter", "Proposal",
]
