"""Forwarding: configured rules send newly received instances to other DICOM nodes with C-STORE.

``rules`` holds the configuration and the matching that ingest calls inside its index
transaction (a matched instance gets one ``forward_job`` row per destination, committed with
the instance). ``delivery`` is the sender: a loop that drains each destination's queue of jobs
over one association per batch, with retries and backoff. The queue is the table, so it
survives restarts and is shared by every process that runs the loop.
"""

from pacs.forwarding.rules import (
    RuleMatch,
    RuleRecord,
    add_rule,
    list_rules,
    queue_forwards,
    remove_rule,
    rule_matches,
)

__all__ = [
    "RuleMatch",
    "RuleRecord",
    "add_rule",
    "list_rules",
    "queue_forwards",
    "remove_rule",
    "rule_matches",
]
