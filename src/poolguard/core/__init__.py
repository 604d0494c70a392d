"""The paths every checkout and every statement take: budgets, the checkout path, the
statement path and the watchdog. This is where poolguard meets SQLAlchemy's events."""
