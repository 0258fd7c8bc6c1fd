"""Expectation suites, one per table, and the Spark views they run on.

Checks that need a second table (session counts against events, visited labels against visited
sets, held-out pairs against training purchases) run on a *prepared view*: the table joined in
Spark with what it is checked against, so every check is a plain single-table expectation and
nothing leaves Spark. Each expectation carries the failure it guards against.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import great_expectations.expectations as gxe
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from infra.tables import BEHAVIORS, EVENTS, FALLBACK, PURCHASE
from validation.runner import Check, Suite


def _day_start(d: date) -> datetime:
    return datetime.combine(d, time(0), tzinfo=UTC).replace(tzinfo=None)


# -- events -------------------------------------------------------------------------------------
#: Every stored column: two rows equal in all of them are the same event ingested twice.
EVENT_COLUMNS = [c for c in EVENTS.column_names if c != "event_date"]


def events_suite(window_first: date, run_date: date, min_rows: int, max_rows: int) -> Suite:
    """Row-level checks on the events of the window; duplicates are ``events_unique``'s."""
    end = _day_start(run_date + timedelta(days=1))
    return Suite(
        "events",
        [
            *(
                Check(
                    gxe.ExpectColumnValuesToNotBeNull(column=c), f"a row without {c} reached the events table"
                )
                for c in ("event_time", "user_id", "item_id", "behavior")
            ),
            Check(
                gxe.ExpectColumnValuesToBeInSet(column="behavior", value_set=list(BEHAVIORS)),
                "a source value mapped to no canonical behaviour",
            ),
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column="event_time", min_value=_day_start(window_first), max_value=end, strict_max=True
                ),
                "an event outside the run's window, or after the run date (clock skew, wrong epoch unit)",
            ),
            Check(
                gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0),
                "a negative price (refunds or a broken price feed)",
            ),
            Check(
                gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, max_value=max_rows),
                "a missing or truncated day (too few rows) or a runaway duplication (too many)",
            ),
        ],
    )


def rows_with_repeated_key(df: DataFrame, key: F.Column, columns: list[str]) -> DataFrame:
    """The rows of ``df`` whose ``key`` occurs more than once (cached; the runner unpersists it).

    GX's compound-uniqueness check sorts the whole table by its columns once per metric (51 s of
    76 s on 10M events). One hash aggregate over the key finds the few candidate rows instead, and
    the exact GX check then runs on those rows only: every duplicate is among them, and a key that
    merely collides (a row hash) cannot fail it.
    """
    repeated = df.select(key.alias("_k")).groupBy("_k").count().filter(F.col("count") > 1).select("_k")
    return df.withColumn("_k", key).join(F.broadcast(repeated), "_k", "left_semi").select(*columns).persist()


def _uniqueness(name: str, df: DataFrame, columns: list[str], key: F.Column, guards: str):
    """A one-check suite "``columns`` unique" and the candidate rows it runs on."""
    suite = Suite(name, [Check(gxe.ExpectCompoundColumnsToBeUnique(column_list=columns), guards)])
    return suite, rows_with_repeated_key(df, key, columns)


def events_unique(events: DataFrame) -> tuple[Suite, DataFrame]:
    """No exact duplicates; candidates are the events whose 64-bit hash of every column repeats."""
    return _uniqueness(
        "events_unique",
        events,
        EVENT_COLUMNS,
        F.xxhash64(*EVENT_COLUMNS),
        "exact duplicate events (a file ingested twice, a retried upload)",
    )


# -- sessions -----------------------------------------------------------------------------------
def sessions_view(sessions: DataFrame, session_events: DataFrame) -> DataFrame:
    """Sessions with what their events say: event count, longest inner gap, rows per (user, session)."""
    w = Window.partitionBy("user_id", "session_id").orderBy("event_time", "seq_in_session")
    gaps = session_events.withColumn(
        "_gap", F.col("event_time").cast("double") - F.lag("event_time").over(w).cast("double")
    )
    per = gaps.groupBy("user_id", "session_id").agg(
        F.count("*").alias("events_in_table"), F.coalesce(F.max("_gap"), F.lit(0.0)).alias("max_gap_seconds")
    )
    return sessions.join(per, ["user_id", "session_id"], "left").withColumn(
        "events_in_table", F.coalesce("events_in_table", F.lit(0))
    )


def sessions_suite(gap_minutes: int) -> Suite:
    return Suite(
        "sessions",
        [
            Check(
                gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="session_end", column_B="session_start", or_equal=True
                ),
                "a session that ends before it starts",
            ),
            Check(
                gxe.ExpectColumnPairValuesToBeEqual(column_A="event_count", column_B="events_in_table"),
                "session counts that disagree with the events carrying the session id",
            ),
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column="max_gap_seconds", min_value=0, max_value=gap_minutes * 60
                ),
                "a gap inside a session longer than the inactivity gap (sessions not split)",
            ),
            Check(gxe.ExpectColumnValuesToNotBeNull(column="session_id"), "an event without a session"),
        ],
    )


SESSION_KEY = ["user_id", "session_id"]


def sessions_unique(sessions: DataFrame) -> tuple[Suite, DataFrame]:
    """Session ids unique per user."""
    return _uniqueness(
        "sessions_unique",
        sessions,
        SESSION_KEY,
        F.struct(*SESSION_KEY),
        "a session id repeated for a user (unstable or colliding ids)",
    )


# -- training tables ----------------------------------------------------------------------------
def heldout_view(
    heldout: DataFrame, visited: DataFrame, interactions: DataFrame, train_events: DataFrame
) -> DataFrame:
    """Held-out pairs with the visited label recomputed, and whether the pair is a purchase of the
    data its model saw: the validation fit's rows (``validation_fit``) for validation pairs, every
    training row for test pairs."""
    pairs = ["user_idx", "item_idx"]
    held = F.broadcast(heldout.select(*pairs).distinct())
    fit = train_events.filter("validation_fit").join(held, pairs, "left_semi")

    def flag(df: DataFrame, name: str) -> DataFrame:
        return df.select(*pairs).distinct().withColumn(name, F.lit(True))

    is_val = F.col("split") == "validation"
    return (
        heldout.join(flag(visited, "_v"), pairs, "left")
        .join(flag(interactions.filter(F.col("behavior") == PURCHASE), "_b"), pairs, "left")
        .join(flag(fit.filter(F.col("behavior") != PURCHASE), "_fv"), pairs, "left")
        .join(flag(fit.filter(F.col("behavior") == PURCHASE), "_fb"), pairs, "left")
        .withColumn(
            "expected_visited",
            F.when(is_val, F.col("_fv").isNotNull()).otherwise(F.col("_v").isNotNull()),
        )
        .withColumn(
            "in_train_purchases",
            F.when(is_val, F.col("_fb").isNotNull()).otherwise(F.col("_b").isNotNull()),
        )
        .drop("_v", "_b", "_fv", "_fb")
    )


def heldout_suite() -> Suite:
    return Suite(
        "training_heldout",
        [
            Check(
                gxe.ExpectColumnPairValuesToBeEqual(column_A="visited", column_B="expected_visited"),
                "a held-out purchase labelled visited/unvisited against the visited set its model saw",
            ),
            Check(
                gxe.ExpectColumnValuesToBeInSet(column="in_train_purchases", value_set=[False]),
                "leakage: a held-out (user, item) pair is also a purchase its model trained on",
            ),
            Check(
                gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["validation", "test"]),
                "an unknown held-out split",
            ),
            Check(
                gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_idx", "item_idx", "split"]),
                "a held-out pair counted twice",
            ),
        ],
    )


def interactions_suite(cutoff: datetime | None) -> Suite:
    checks = [
        *(
            Check(gxe.ExpectColumnValuesToNotBeNull(column=c), f"an interaction without {c}")
            for c in ("user_idx", "item_idx", "behavior")
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="behavior", value_set=list(BEHAVIORS)),
            "an unknown behaviour in the training graph",
        ),
        Check(gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1), "an empty interaction"),
    ]
    if cutoff is not None:
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column="last_time", max_value=cutoff.replace(tzinfo=None), strict_max=True
                ),
                "leakage: a training row at or after the cutoff",
            )
        )
    return Suite("training_interactions", checks)


def id_map_suite(kind: str, rows: int, minimum: int) -> Suite:
    """``kind`` is user or item: the map must be one-to-one and its indices exactly 0..n-1."""
    return Suite(
        f"training_{kind}_map",
        [
            Check(
                gxe.ExpectColumnValuesToBeUnique(column=f"{kind}_id"), f"a {kind} id mapped to two indices"
            ),
            Check(gxe.ExpectColumnValuesToBeUnique(column=f"{kind}_idx"), f"two {kind} ids sharing an index"),
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column=f"{kind}_idx", min_value=0, max_value=max(rows - 1, 0)
                ),
                f"{kind} indices not contiguous from 0 (unique + in 0..n-1 means exactly 0..n-1)",
            ),
            Check(gxe.ExpectColumnValuesToNotBeNull(column=f"{kind}_id"), f"a null {kind} id"),
            Check(
                gxe.ExpectTableRowCountToBeBetween(min_value=minimum),
                f"too few {kind}s to train on (split.min_{kind}s)",
            ),
        ],
    )


# -- scores -------------------------------------------------------------------------------------
# -- serving bundle -----------------------------------------------------------------------------
def _within_days(column: str, first: date, last: date, guards: str) -> Check:
    """``column`` (a timestamp) on a day from ``first`` to ``last``, both included."""
    return Check(
        gxe.ExpectColumnValuesToBeBetween(
            column=column,
            min_value=_day_start(first),
            max_value=_day_start(last + timedelta(days=1)),
            strict_max=True,
        ),
        guards,
    )


def serving_context_suite(active_from: date, run_date: date, active_users: int, history_length: int) -> Suite:
    """``active_users``: distinct users of the date's events in the active window, counted apart."""
    return Suite(
        "serving_context",
        [
            Check(gxe.ExpectColumnValuesToBeUnique(column="user_id"), "a user with two context rows"),
            *(
                Check(gxe.ExpectColumnValuesToNotBeNull(column=c), f"a context row without {c}")
                for c in ("user_id", "visited", "bought", "history_items", "history_behaviors")
            ),
            Check(
                gxe.ExpectTableRowCountToBeBetween(min_value=active_users, max_value=active_users),
                f"not exactly the {active_users} users active in the window (users lost or invented)",
            ),
            _within_days(
                "last_event",
                active_from,
                run_date,
                "a context user whose latest event is outside the active window, or after the date",
            ),
            Check(
                gxe.ExpectColumnValuesToBeBetween(column="events", min_value=1),
                "a context row with no event behind it",
            ),
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column="history_length", min_value=0, max_value=history_length
                ),
                f"a history longer than scoring.history_length={history_length}",
            ),
            Check(
                gxe.ExpectColumnPairValuesToBeEqual(
                    column_A="history_length", column_B="history_behaviors_length"
                ),
                "history items and behaviours of different lengths (events misaligned)",
            ),
        ],
    )


def serving_context_view(context: DataFrame) -> DataFrame:
    return context.withColumns(
        {
            "history_length": F.size("history_items"),
            "history_behaviors_length": F.size("history_behaviors"),
        }
    )


def catalogue_suite(first: date, run_date: date, items: int) -> Suite:
    """``items``: the catalogue's row count (ranks must be exactly 1..items)."""
    return Suite(
        "catalogue",
        [
            Check(gxe.ExpectColumnValuesToBeUnique(column="item_id"), "an item listed twice"),
            Check(gxe.ExpectColumnValuesToNotBeNull(column="item_id"), "a catalogue row without an item"),
            Check(
                gxe.ExpectColumnValuesToBeUnique(column="popularity_rank"), "two items at one popularity rank"
            ),
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column="popularity_rank", min_value=1, max_value=max(items, 1)
                ),
                "a popularity rank outside 1..items (the fallback's order has gaps)",
            ),
            _within_days(
                "last_seen",
                first,
                run_date,
                "an item without an event in the catalogue window (it may be gone from the shop)",
            ),
            Check(
                gxe.ExpectTableRowCountToBeBetween(min_value=1),
                "an empty catalogue: nothing could be recommended",
            ),
        ],
    )


def scores_view(scores: DataFrame, context: DataFrame, catalogue: DataFrame) -> DataFrame:
    """Scores with per-user checks and flags against the date's serving bundle: ``context``
    (``serving_context``: the active users, their visited sets and purchases as of the date) and
    ``catalogue`` (the items that may be recommended)."""
    per_user = Window.partitionBy("user_id")
    by_rank = per_user.orderBy("rank")
    users = context.select("user_id", "visited", "bought", F.lit(True).alias("active_user"))
    items = catalogue.select("item_id", F.lit(True).alias("in_catalogue"))
    prev = F.lag("score").over(by_rank)
    fallback = (F.col("expert") == F.lit(FALLBACK)).cast("double")
    out = (
        scores.withColumn("rows_of_user", F.count("*").over(per_user))
        .withColumn("max_rank_of_user", F.max("rank").over(per_user))
        .withColumn("score_not_above_previous", prev.isNull() | (F.col("score") <= prev))
        .withColumn("fallback_user", F.min(F.coalesce(fallback, F.lit(0.0))).over(per_user))
        .join(F.broadcast(items), ["item_id"], "left")
        .join(users, ["user_id"], "left")
        .withColumn("in_catalogue", F.coalesce("in_catalogue", F.lit(False)))
        .withColumn("active_user", F.coalesce("active_user", F.lit(False)))
        .withColumn("already_bought", F.coalesce(F.array_contains("bought", F.col("item_id")), F.lit(False)))
        .withColumn(
            "expected_item_type",
            F.when(
                F.coalesce(F.array_contains("visited", F.col("item_id")), F.lit(False)), "visited"
            ).otherwise("unvisited"),
        )
        .drop("visited", "bought")
    )
    return out


def with_drift(view: DataFrame, previous: DataFrame, k: int, coverage_ratio: float) -> DataFrame:
    """``view`` with ``overlap_with_previous`` (the share of the user's top K that was in their
    previous night's list; null for a user not scored then) and ``coverage_ratio`` (a constant)."""
    prev = previous.select("user_id", "item_id", F.lit(1).alias("_was"))
    users = previous.select("user_id").distinct().withColumn("_scored_before", F.lit(True))
    per_user = Window.partitionBy("user_id")
    overlap = F.sum(F.coalesce("_was", F.lit(0))).over(per_user) / F.lit(float(k))
    return (
        view.join(prev, ["user_id", "item_id"], "left")
        .join(users, "user_id", "left")
        .withColumn("overlap_with_previous", F.when(F.col("_scored_before"), overlap))
        .withColumn("coverage_ratio", F.lit(float(coverage_ratio)))
        .drop("_was", "_scored_before")
    )


def drift_checks(previous: date, min_overlap: float, min_coverage_ratio: float) -> list[Check]:
    """Day-over-day collapse against the ``previous`` published date (on a ``with_drift`` view)."""
    return [
        Check(
            gxe.ExpectColumnMeanToBeBetween(column="overlap_with_previous", min_value=min_overlap),
            f"lists replaced wholesale overnight: mean overlap with {previous}'s top K below {min_overlap} "
            "(an id mapping or context bug, or a broken champion)",
        ),
        Check(
            gxe.ExpectColumnMinToBeBetween(column="coverage_ratio", min_value=min_coverage_ratio),
            f"catalogue coverage collapsed against {previous}'s (below {min_coverage_ratio} of it): the "
            "champion recommends a few items to everyone",
        ),
    ]


def scores_suite(k: int, active_users: int, max_fallback_share: float) -> Suite:
    """``active_users``: the users of the date's serving context, every one of whom must be scored;
    ``max_fallback_share``: the largest share of them the fallback may serve (its observed value is
    in the result either way)."""
    checks = [
        *(
            Check(gxe.ExpectColumnValuesToNotBeNull(column=c), f"a recommendation without {c}")
            for c in ("user_id", "item_id", "rank", "score", "item_type", "model_version", "run_id")
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="item_type", value_set=["visited", "unvisited"]),
            "an item type other than visited/unvisited",
        ),
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1, max_value=k),
            f"a rank outside 1..{k}",
        ),
        Check(
            gxe.ExpectColumnPairValuesToBeEqual(column_A="rows_of_user", column_B="max_rank_of_user"),
            "gaps in a user's ranks (rows dropped after ranking)",
        ),
        Check(
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "rank"]),
            "two items at one rank for a user",
        ),
        Check(
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id"]),
            "an item recommended twice to one user",
        ),
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="score", min_value=-1e30, max_value=1e30),
            "a non-finite score (an excluded item leaked into the top K, or NaN weights)",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="already_bought", value_set=[False]),
            "an item recommended to a user who already bought it",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="active_user", value_set=[True]),
            "a recommendation for a user with no event in the active window",
        ),
        Check(
            gxe.ExpectColumnUniqueValueCountToBeBetween(column="model_version", min_value=1, max_value=1),
            "rows of two model versions in one date (a mixed or half-rewritten partition)",
        ),
        Check(
            gxe.ExpectColumnUniqueValueCountToBeBetween(
                column="user_id", min_value=active_users, max_value=active_users
            ),
            f"not every one of the {active_users} active users scored",
        ),
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="rows_of_user", min_value=k, max_value=k),
            f"a scored user with other than K={k} recommendations",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="score_not_above_previous", value_set=[True]),
            "a score higher than the one ranked above it (ranks not in score order)",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="in_catalogue", value_set=[True]),
            "an item outside the date's catalogue (no event in the last scoring.catalogue_days days)",
        ),
        Check(
            gxe.ExpectColumnPairValuesToBeEqual(column_A="item_type", column_B="expected_item_type"),
            "an item type that disagrees with the user's visited set as of the date (serving_context)",
        ),
        # Every user has K rows, so the mean over rows is the share of users.
        Check(
            gxe.ExpectColumnMeanToBeBetween(
                column="fallback_user", min_value=0.0, max_value=max_fallback_share
            ),
            "the champion could score too few of the active users (its training tables too old, or a "
            f"wrong id mapping): more than {max_fallback_share:.0%} served by the popularity fallback",
        ),
    ]
    return Suite("scores", checks)
