"""The budget: each request's worst case is reserved before it is sent, so a run never passes ``budget_usd``."""

from __future__ import annotations


class Budget:
    """Reserves each request's worst case so a run never passes ``budget_usd``."""

    def __init__(self, limit: float | None, spent: float) -> None:
        self.limit = limit
        self.spent = spent
        self.reserved = 0.0

    def reserve(self, worst: float) -> bool:
        if self.limit is None:
            return True
        if self.spent + self.reserved + worst > self.limit:
            return False
        self.reserved += worst
        return True

    def within_limit(self) -> bool:
        return self.limit is None or self.spent + self.reserved <= self.limit

    def settle(self, worst: float, actual: float) -> None:
        if self.limit is not None:
            self.reserved -= worst
        self.spent += actual
