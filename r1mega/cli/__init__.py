"""Entry points: train, sft, pipeline, sample, eval, convert, bench, submit.

Importing any of them first holds back the third-party warnings known to be harmless (see
r1mega.platform.logs), before megatron-core is imported and issues them.
"""

from r1mega.platform.logs import collapse_known_warnings

collapse_known_warnings()
