"""Use cases of the accounting Application, in memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from domain.access import SYSTEM, Actor
from domain.accounting import Accounting
from domain.api_key import KeySettings, KeyStatus, hash_secret, looks_like_secret
from domain.catalog import BackendKind, Deployment, DeploymentConflict, ModelExists, ModelNotFound
from domain.errors import (
    AlreadyAMember,
    DuplicateRequest,
    EmailTaken,
    InvalidAmount,
    InvalidValue,
    KeyRevoked,
    LastCreatorRemoved,
    NegativeGrant,
    NotAMember,
    PermissionDenied,
    ProjectArchived,
    ProjectCodeTaken,
    UserNotFound,
)
from domain.pricing import Prices
from domain.project import Role
from domain.usage import ENTRIES_PER_BATCH_MAX, UsageEntry
from tests.unit.conftest import PEPPER

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def entry(request_id: str, project_id, key_id, cost: int = 7) -> UsageEntry:
    return UsageEntry(request_id, project_id, key_id, "llama-3", "vllm-a", 10, 0, 5, cost, 1000, 1500)


@pytest.fixture
def world(app: Accounting):
    creator = app.register_user("creator@example.org", "Creator")
    manager = app.register_user("manager@example.org", "Manager")
    user = app.register_user("user@example.org", "User")
    outsider = app.register_user("outsider@example.org", "Outsider")
    project = app.create_project(SYSTEM, "nlp-lab", "NLP Lab", creator)
    app.add_member(app.actor_for(creator), project, manager, Role.MANAGER)
    app.add_member(app.actor_for(manager), project, user, Role.USER)
    return {"creator": creator, "manager": manager, "user": user, "outsider": outsider, "project": project}


def test_email_is_unique_case_insensitively(app: Accounting) -> None:
    app.register_user("Ann@Example.org", "Ann")
    with pytest.raises(EmailTaken):
        app.register_user("ann@example.org", "Other Ann")
    assert app.find_user_by_email("ANN@example.org").display_name == "Ann"


def test_changing_email_frees_the_old_address(app: Accounting) -> None:
    ann = app.register_user("ann@example.org", "Ann")
    app.update_profile(ann, display_name="Ann B", email="ann.b@example.org")
    with pytest.raises(UserNotFound):
        app.find_user_by_email("ann@example.org")
    bob = app.register_user("ann@example.org", "Bob")
    assert app.find_user_by_email("ann@example.org").id == bob


def test_sso_subject_maps_to_one_user(app: Accounting) -> None:
    uid = app.register_user("s@example.org", "S", subject="https://idp|123")
    assert app.find_user_by_subject("https://idp|123").id == uid
    with pytest.raises(Exception, match="identity"):
        app.register_user("t@example.org", "T", subject="https://idp|123")


def test_signing_in_with_an_identity_finds_links_or_registers_the_user(app: Accounting) -> None:
    first = app.sign_in_with_identity("idp|a", email="a@uni.edu", email_verified=True, display_name="A")
    assert app.get_user(first).subject == "idp|a"
    again = app.sign_in_with_identity("idp|a", email="a.new@uni.edu", email_verified=True, display_name="A. New")
    assert again == first and app.get_user(first).email == "a.new@uni.edu"  # the profile follows the claims
    invited = app.register_user("b@uni.edu", "B")  # added by e-mail before their first SSO login
    assert app.sign_in_with_identity("idp|b", email="b@uni.edu", email_verified=True, display_name="B") == invited
    assert app.find_user_by_subject("idp|b").id == invited
    app.register_user("c@uni.edu", "C")
    with pytest.raises(EmailTaken):  # an unverified e-mail never takes over an existing account
        app.sign_in_with_identity("idp|c", email="c@uni.edu", email_verified=False, display_name="C")
    with pytest.raises(EmailTaken):  # nor does a second identity
        app.sign_in_with_identity("idp|b2", email="b@uni.edu", email_verified=True, display_name="B")


def test_project_code_is_unique(app: Accounting, world) -> None:
    with pytest.raises(ProjectCodeTaken):
        app.create_project(SYSTEM, "NLP-LAB", "Again", world["creator"])


def test_only_admins_create_projects_and_grant(app: Accounting, world) -> None:
    creator = app.actor_for(world["creator"])
    with pytest.raises(PermissionDenied):
        app.create_project(creator, "other", "Other", world["creator"])
    with pytest.raises(PermissionDenied):
        app.grant_credits(creator, world["project"], 100, "self-service")


def test_grants_must_be_positive_and_corrections_nonzero(app: Accounting, world) -> None:
    with pytest.raises(NegativeGrant):
        app.grant_credits(SYSTEM, world["project"], -5, "oops")
    with pytest.raises(NegativeGrant):
        app.grant_credits(SYSTEM, world["project"], 0, "oops")
    with pytest.raises(InvalidAmount):
        app.correct_credits(SYSTEM, world["project"], 0, "nothing")
    with pytest.raises(InvalidAmount):
        app.grant_credits(SYSTEM, world["project"], 1.5, "float")  # type: ignore[arg-type]
    app.grant_credits(SYSTEM, world["project"], 1000, "initial")
    app.correct_credits(SYSTEM, world["project"], -200, "overcharge reversed")
    project = app.get_project(world["project"])
    assert (project.granted_credits, project.corrections_credits) == (1000, -200)


def test_creator_cannot_be_removed_or_demoted(app: Accounting, world) -> None:
    with pytest.raises(LastCreatorRemoved):
        app.remove_member(SYSTEM, world["project"], world["creator"])
    with pytest.raises(LastCreatorRemoved):
        app.change_role(SYSTEM, world["project"], world["creator"], Role.USER)
    with pytest.raises(LastCreatorRemoved):
        app.add_member(SYSTEM, world["project"], world["outsider"], Role.CREATOR)


def test_creator_hands_over_and_stays_as_manager(app: Accounting, world) -> None:
    app.hand_over_creator(app.actor_for(world["creator"]), world["project"], world["user"])
    project = app.get_project(world["project"])
    assert project.creator_id == world["user"]
    assert project.role_of(world["creator"]) is Role.MANAGER
    with pytest.raises(NotAMember):
        app.hand_over_creator(SYSTEM, world["project"], world["outsider"])


def test_managers_manage_users_but_not_managers(app: Accounting, world) -> None:
    manager = app.actor_for(world["manager"])
    app.add_member(manager, world["project"], world["outsider"], Role.USER)
    with pytest.raises(AlreadyAMember):
        app.add_member(manager, world["project"], world["outsider"], Role.USER)
    app.remove_member(manager, world["project"], world["outsider"])
    with pytest.raises(PermissionDenied):
        app.add_member(manager, world["project"], world["outsider"], Role.MANAGER)
    with pytest.raises(PermissionDenied):
        app.change_role(manager, world["project"], world["user"], Role.MANAGER)
    user = app.actor_for(world["user"])
    with pytest.raises(PermissionDenied):
        app.add_member(user, world["project"], world["outsider"], Role.USER)


def test_users_manage_only_their_own_keys(app: Accounting, world) -> None:
    user = app.actor_for(world["user"])
    key_id, secret = app.create_key(user, world["project"], world["user"], KeySettings(name="mine"))
    assert looks_like_secret(secret)
    with pytest.raises(PermissionDenied):
        app.create_key(user, world["project"], world["manager"], KeySettings(name="theirs"))
    manager_key, _ = app.create_key(app.actor_for(world["manager"]), world["project"], world["manager"],
                                    KeySettings(name="m"))
    with pytest.raises(PermissionDenied):
        app.revoke_key(user, manager_key)
    app.revoke_key(app.actor_for(world["manager"]), key_id)
    with pytest.raises(PermissionDenied):
        app.create_key(app.actor_for(world["outsider"]), world["project"], world["outsider"], KeySettings(name="x"))


def test_secret_is_stored_only_as_keyed_hash(app: Accounting, world) -> None:
    key_id, secret = app.create_key(SYSTEM, world["project"], world["user"], KeySettings(name="k"))
    key = app.get_key(key_id)
    assert key.secret_hash == hash_secret(secret, PEPPER)
    assert key.display_prefix == secret[:12]
    stored = b"".join(n.state for n in app.notification_log.select(start=1, limit=10, stop=None))
    stored += b"".join(n.state for n in app.recorder.select_notifications(start=1, limit=1000))
    assert secret.encode() not in stored
    assert secret[12:].encode() not in stored


def test_key_status_is_a_function_of_state_and_time(app: Accounting, world) -> None:
    settings = KeySettings(name="windowed", valid_from=NOW, valid_until=NOW + timedelta(days=1), cap_credits=100)
    key_id, _ = app.create_key(SYSTEM, world["project"], world["user"], settings)
    key = app.get_key(key_id)
    assert key.status_at(NOW - timedelta(seconds=1)) is KeyStatus.NOT_YET_VALID
    assert key.status_at(NOW) is KeyStatus.ACTIVE
    assert key.status_at(NOW, used_credits=100) is KeyStatus.OVER_CAP
    assert key.status_at(NOW + timedelta(days=1)) is KeyStatus.EXPIRED
    app.revoke_key(SYSTEM, key_id)
    assert app.get_key(key_id).status_at(NOW) is KeyStatus.REVOKED


def test_revoked_key_cannot_be_edited_or_revoked_again(app: Accounting, world) -> None:
    key_id, _ = app.create_key(SYSTEM, world["project"], world["user"], KeySettings(name="k"))
    for name in ("a", "b"):
        app.add_model(SYSTEM, name, Deployment(name, BackendKind.OPENAI, "http://h", name), Prices(1, 1, NOW))
    app.edit_key(SYSTEM, key_id, KeySettings(name="renamed", rpm_limit=60, allowed_models=("b", "a", "a")))
    assert app.get_key(key_id).settings.allowed_models == ("a", "b")
    app.revoke_key(SYSTEM, key_id)
    with pytest.raises(KeyRevoked):
        app.edit_key(SYSTEM, key_id, KeySettings(name="again"))
    with pytest.raises(KeyRevoked):
        app.revoke_key(SYSTEM, key_id)


@pytest.mark.parametrize(
    "settings",
    [
        KeySettings(name=""),
        KeySettings(name="x" * 500),
        KeySettings(name="k", rpm_limit=0),
        KeySettings(name="k", tpm_limit=-1),
        KeySettings(name="k", cap_credits=-1),
        KeySettings(name="k", valid_from=NOW, valid_until=NOW),
        KeySettings(name="k", valid_from=datetime(2026, 1, 1)),  # naive on purpose
        KeySettings(name="k", allowed_models=("bad model name",)),
        KeySettings(name="k", allowed_models=("not-in-the-catalog",)),
        KeySettings(name="k\x00"),
    ],
)
def test_bad_key_settings_are_refused(app: Accounting, world, settings: KeySettings) -> None:
    with pytest.raises((InvalidValue, ModelNotFound)):
        app.create_key(SYSTEM, world["project"], world["user"], settings)
    assert app.keys_of_project(SYSTEM, world["project"]) == []


def test_removing_a_member_revokes_their_keys(app: Accounting, world) -> None:
    key_id, _ = app.create_key(SYSTEM, world["project"], world["user"], KeySettings(name="k"))
    app.remove_member(app.actor_for(world["manager"]), world["project"], world["user"])
    assert app.get_key(key_id).revoked


def test_archived_project_takes_no_new_keys_or_grants(app: Accounting, world) -> None:
    app.archive_project(SYSTEM, world["project"])
    with pytest.raises(ProjectArchived):
        app.create_key(SYSTEM, world["project"], world["user"], KeySettings(name="k"))
    with pytest.raises(ProjectArchived):
        app.grant_credits(SYSTEM, world["project"], 10, "late")


def test_usage_batch_is_recorded_once(app: Accounting, world) -> None:
    key_id, _ = app.create_key(SYSTEM, world["project"], world["user"], KeySettings(name="k"))
    batch = [entry(f"req-{i}", world["project"], key_id) for i in range(3)]
    batch_id = uuid4()
    assert not app.record_usage(batch_id, batch).already_recorded
    assert app.record_usage(batch_id, batch).already_recorded
    with pytest.raises(DuplicateRequest) as refused:
        app.record_usage(uuid4(), [entry("req-new", world["project"], key_id), batch[1]])
    assert refused.value.request_ids == ["req-1"]
    # the refused batch left nothing behind: its fresh request id is still free
    app.record_usage(uuid4(), [entry("req-new", world["project"], key_id)])


def test_usage_batch_refuses_bad_entries(app: Accounting, world) -> None:
    pid, kid = world["project"], uuid4()
    with pytest.raises(DuplicateRequest):
        app.record_usage(uuid4(), [entry("same", pid, kid), entry("same", pid, kid)])
    with pytest.raises(InvalidValue):
        app.record_usage(uuid4(), [])
    with pytest.raises(InvalidValue):
        app.record_usage(uuid4(), [entry("r", pid, kid, cost=-1)])
    with pytest.raises(InvalidValue):
        app.record_usage(uuid4(), [UsageEntry("r", pid, kid, "m", "", 1, 2, 1, 1, 0, 0)])
    with pytest.raises(InvalidValue):
        app.record_usage(uuid4(), [UsageEntry("r", pid, kid, "m", "", 1, 0, 1, 1, 5, 4)])
    with pytest.raises(InvalidValue):
        app.record_usage(uuid4(), [entry(f"r{i}", pid, kid) for i in range(ENTRIES_PER_BATCH_MAX + 1)])


def test_non_admin_actor_flag_comes_from_the_user(app: Accounting, world) -> None:
    assert app.actor_for(world["user"]) == Actor(world["user"], is_admin=False)
    app.set_admin(SYSTEM, world["user"], is_admin=True)
    assert app.actor_for(world["user"]).is_admin


def test_model_catalog_prices_and_deployments(app: Accounting) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    gpu1 = Deployment("gpu1", BackendKind.VLLM, "http://10.0.0.5:8000/v1/", "meta/llama-3-8b")
    app.add_model(SYSTEM, "llama-3", gpu1, Prices(100, 300, t0), "Llama 3 8B")
    with pytest.raises(ModelExists):
        app.add_model(SYSTEM, "llama-3", gpu1, Prices(1, 1, t0))
    with pytest.raises(PermissionDenied):
        app.add_model(Actor(uuid4(), is_admin=False), "other", gpu1, Prices(1, 1, t0))
    app.change_model(SYSTEM, "llama-3", lambda m: m.change_prices(Prices(200, 600, t0 + timedelta(days=30))))
    app.change_model(SYSTEM, "llama-3", lambda m: m.add_deployment(
        Deployment("gpu2", BackendKind.OLLAMA, "http://10.0.0.6:11434", "llama3", weight=2)))
    with pytest.raises(DeploymentConflict):
        app.change_model(SYSTEM, "llama-3", lambda m: m.add_deployment(gpu1))
    model = app.get_model("llama-3")
    assert model.deployments[0].base_url == "http://10.0.0.5:8000/v1"
    assert model.price_at(t0 - timedelta(seconds=1)) is None
    assert model.price_at(t0 + timedelta(days=29)).prompt_per_mtok == 100
    assert model.price_at(t0 + timedelta(days=30)).prompt_per_mtok == 200
    app.change_model(SYSTEM, "llama-3", lambda m: m.remove())
    with pytest.raises(ModelNotFound):
        app.get_model("llama-3")
    app.add_model(SYSTEM, "llama-3", gpu1, Prices(50, 50, t0 + timedelta(days=60)))
    restored = app.get_model("llama-3")
    assert [d.name for d in restored.deployments] == ["gpu1"] and len(restored.price_schedule) == 3


@pytest.mark.parametrize(
    ("prompt", "cached", "completion", "expected"),
    [(0, 0, 0, 0), (1, 0, 0, 1), (1_000_000, 0, 0, 100), (1_000_000, 1_000_000, 0, 25),
     (333_333, 0, 1, 34), (10, 0, 10, 1)],
)
def test_cost_is_integer_and_rounded_up(prompt: int, cached: int, completion: int, expected: int) -> None:
    prices = Prices(prompt_per_mtok=100, completion_per_mtok=300, effective_at=NOW, cached_prompt_per_mtok=25)
    assert prices.cost_credits(prompt, cached, completion) == expected


@pytest.mark.parametrize(
    "deployment",
    [("GPU 1", "http://h:1", "m", None), ("g", "ftp://h", "m", None), ("g", "http://u:p@h", "m", None),
     ("g", "http://h", "m", "sk-plaintext-secret"), ("g", "http://h?x=1", "m", None), ("g", "http://h", "", None)],
)
def test_bad_deployments_are_refused(app: Accounting, deployment) -> None:
    name, url, upstream, credential = deployment
    with pytest.raises(InvalidValue):
        app.add_model(SYSTEM, "m", Deployment(name, BackendKind.OPENAI, url, upstream, credential),
                      Prices(1, 1, NOW))


@pytest.mark.parametrize("tokenizer", ["tiktoken", "file:relative/tokenizer.json", "vllm ", "file:/", "llama.cpp"])
def test_bad_tokenizer_sources_are_refused(app: Accounting, tokenizer: str) -> None:
    with pytest.raises(InvalidValue, match="tokenizer must be"):
        app.add_model(SYSTEM, "m", Deployment("g", BackendKind.OPENAI, "http://h", "m", tokenizer=tokenizer),
                      Prices(1, 1, NOW))


def test_a_deployment_keeps_its_tokenizer_source(app: Accounting) -> None:
    app.add_model(SYSTEM, "m", Deployment("g", BackendKind.OPENAI, "http://h", "m", tokenizer="estimate"),
                  Prices(1, 1, NOW))
    assert app.get_model("m").deployments[0].tokenizer == "estimate"


def test_an_entry_carries_its_prices_and_its_cost_must_be_its_tokens_at_them() -> None:
    p, k = uuid4(), uuid4()
    priced = UsageEntry("r", p, k, "m", "d", 1_000, 200, 500, 1, 0, 1, False, 100, 300, 50)
    assert priced.validate() and UsageEntry.from_row(priced.to_row()) == priced  # 0.08 + 0.01 + 0.15 → 1 credit
    with pytest.raises(InvalidValue, match="not the tokens at the entry's prices"):
        UsageEntry("r", p, k, "m", "d", 1_000, 200, 500, 2, 0, 1, False, 100, 300, 50).validate()
    legacy_row = priced.to_row()[:12]  # recorded before prices were kept: still read, its cost stands
    assert UsageEntry.from_row(legacy_row).price_prompt is None
    with pytest.raises(InvalidValue, match="fields"):
        UsageEntry.from_row(priced.to_row()[:5])


class _DriverUuid(UUID):
    """Database drivers hand out UUID subclasses (asyncpg's own type): entries built from them are valid."""


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens_prompt": -1}, "tokens_prompt must be an integer"),
    ({"tokens_completion": True}, "tokens_completion must be an integer"),
    ({"tokens_prompt_cached": 2_000}, "cached prompt tokens exceed prompt tokens"),
    ({"cost_credits": 1.0}, "cost_credits must be an integer"),
    ({"finished_at_ms": -5}, "finished_at_ms must be an integer"),
    ({"started_at_ms": 2}, "cannot finish before it starts"),
    ({"estimated": 0}, "estimated must be a boolean"),
    ({"project_id": "not-a-uuid"}, "must be UUIDs"),
    ({"deployment": "d" * 201}, "deployment must be text"),
    ({"model": ""}, "model must be printable text"),
    ({"request_id": "r\n"}, "request id must be printable text"),
    ({"price_prompt": -1}, "price_prompt must be an integer"),
])
def test_each_broken_rule_of_an_entry_is_named(change: dict[str, object], message: str) -> None:
    fields = {"request_id": "r", "project_id": _DriverUuid(int=1), "key_id": _DriverUuid(int=2), "model": "m",
              "deployment": "d", "tokens_prompt": 1_000, "tokens_prompt_cached": 200, "tokens_completion": 500,
              "cost_credits": 1, "started_at_ms": 0, "finished_at_ms": 1, "estimated": False,
              "price_prompt": 100, "price_completion": 300, "price_cached": 50}
    assert UsageEntry(**fields).validate()  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match=message):
        UsageEntry(**(fields | change)).validate()  # type: ignore[arg-type]
