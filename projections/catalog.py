"""The read models, in the order the follower applies them.

Imports: projections.
"""

from __future__ import annotations

from projections.api_keys import ApiKeysProjection
from projections.balances import BalancesProjection
from projections.base import Projection
from projections.key_usage import KeyUsageProjection
from projections.ledger import LedgerProjection
from projections.memberships import MembershipsProjection
from projections.models import ModelsProjection
from projections.projects import ProjectsProjection
from projections.usage_rollups import UsageRollupsProjection
from projections.users import UsersProjection


def all_projections() -> list[Projection]:
    return [
        UsersProjection(), ProjectsProjection(), MembershipsProjection(), ApiKeysProjection(),
        BalancesProjection(), KeyUsageProjection(), UsageRollupsProjection(), ModelsProjection(),
        LedgerProjection(),
    ]
