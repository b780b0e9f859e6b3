"""The administrator's pages (issue 16, viewer_api/ui/admin_pages.py and admin_ops_pages.py), in a browser.

One `pacs serve` and one Chromium for the module, at 1366×768. The journey starts at the sign-in page and follows
links only: register the AE ``CT_HUE_01`` (title, host, port, facility) and see it listed; change its identity check
and remove another peer through their pages; add a forwarding rule to it; open the audit trail,
filter by action and see that registration's row with the administrator as the actor; verify the chain (intact);
create a user (the generated password shown once), create an API token (its secret shown once) and revoke another;
retry a failed derived task; follow the storage page to the studies due under the retention policy; see the health
page report the object store missing, then working again — each change audited with the signed-in
administrator. Every page is walked with the keyboard (each control reached, its focus visible). The same pages
in Vietnamese, with a form's errors shown per field and translated. A technologist gets 403 on ``/ui/admin/aes``;
a post without the CSRF token is refused (and changes nothing), and so is a change by an administrator of one
facility; axe-core finds no serious violation; no console error, failed request or error status during the
journey.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, update

from pacs import admin_actions
from pacs.aes import add_ae, lookup
from pacs.audit.search import make_filter, search
from pacs.db.models import DerivedTask
from pacs.errors import InvalidInput
from pacs.security import accounts
from pacs.security.models import ApiToken
from pacs.security.principal import Principal
from pacs.security.roles import Capability, Role
from tests.support.datasets import make_dataset
from tests.support.senders import send_dataset
from tests.support.tiers import starts_servers
from tests.support.ui import (
    PASSWORD,
    UiWorld,
    assert_clean,
    assert_keyboard_reachable,
    axe,
    screenshot,
    sign_in,
    ui_world_of,
)

pytestmark = pytest.mark.integration


@dataclass
class World:
    ui: UiWorld
    token_id: int
    study_uid: str

    @property
    def pacs(self) -> Any:
        return self.ui.server

    @property
    def base(self) -> str:
        return self.ui.base_url


RETENTION = {"*": 10}  # years: the module's study of 2010 is due


@pytest.fixture(scope="module")
@starts_servers
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """An archive (a retention policy of 10 years) and a browser, plus an administrator of one facility, an EMR
    token to revoke and a peer to remove."""
    with ui_world_of(tmp_path_factory.mktemp("ui-admin"),
                     {"PACS_STUDY_RETENTION_YEARS": json.dumps(RETENTION)}) as ui_world:
        with ui_world.server.ctx.sessions.begin() as session:
            accounts.create_user(session, "hue_admin", PASSWORD, "admin", facility="HOSP-A")
            token = accounts.create_token(session, "emr-hue", "emr", days=30, facility="HOSP-A")
            add_ae(session, "US_OLD_03", "192.0.2.30", 104, "Siêu âm cũ", facility="HOSP-A")
        study = generate_uid()
        for number in (1, 2):  # two images for the storage figures (C-STORE from a peer)
            ds = make_dataset(StudyInstanceUID=study, InstanceNumber=number, PatientName="Nguyễn^Văn^An",
                              StudyDate="20100315")
            assert send_dataset(ui_world.server.port, ds, ExplicitVRLittleEndian).status == 0
        yield World(ui_world, token.id, study)


def _audit_rows(world: World, action: str) -> list[dict[str, Any]]:
    with world.pacs.ctx.read_sessions() as session:
        return search(session, make_filter(action=action), 100, 0)


def _sign_in(page: Page, world: World, who: str) -> None:
    username = who if who == "hue_admin" else world.ui.users[who][0]
    sign_in(page, world.base, username, PASSWORD)


def _sub_nav(page: Page, name: str) -> None:
    page.locator("nav.admin-nav").get_by_role("link", name=name, exact=True).click()
    page.wait_for_load_state("load")


def _fail_a_task(world: World) -> int:
    """One finished derived task of the module's study marked failed, as a task that used up its attempts is left
    (pacs.derived): its number."""
    for _ in range(120):
        with world.pacs.ctx.sessions.begin() as session:
            task_id = session.scalar(select(DerivedTask.id).where(DerivedTask.state == "done")
                                     .order_by(DerivedTask.id).limit(1))
            if task_id is not None and session.execute(
                    update(DerivedTask).where(DerivedTask.id == task_id, DerivedTask.state == "done")
                    .values(state="failed", attempts=5, last_error="OSError: no space left on device")).rowcount:
                return int(task_id)
        time.sleep(0.25)
    raise AssertionError("no derived task finished")


def test_admin_journey(world: World) -> None:
    admin = world.ui.users["admin"][0]
    with world.ui.browser_page("en") as (page, log):
        page.on("dialog", lambda dialog: dialog.accept())  # the revoke button's confirmation (ui.js)
        _sign_in(page, world, "admin")
        if not page.url.rstrip("/").endswith("/ui/admin"):  # the admin's home is the overview; else the menu
            page.locator("nav.site-nav").get_by_role("link", name="Administration").click()
        expect(page.locator("h1")).to_have_text("Administration")
        expect(page.locator("#health-summary")).to_contain_text("Everything is working")
        assert axe(page) == []
        assert_keyboard_reachable(page)

        # register a DICOM peer
        _sub_nav(page, "DICOM peers")
        page.locator("#f-title").fill("CT_HUE_01")
        page.locator("#f-host").fill("192.0.2.10")
        page.locator("#f-port").fill("104")
        page.locator("#f-facility").fill("HUE")
        page.locator("#f-description").fill("CT phòng 2")
        page.locator("#ae-form button[type=submit]").click()
        page.wait_for_load_state("load")
        expect(page.locator(".flash")).to_contain_text("Registered CT_HUE_01")
        row = page.locator("#ae-table tbody tr", has_text="CT_HUE_01")
        expect(row).to_contain_text("192.0.2.10:104")
        expect(row).to_contain_text("HUE")
        expect(row).to_contain_text("calling host")
        assert axe(page) == []
        assert_keyboard_reachable(page)
        with world.pacs.ctx.read_sessions() as session:
            rec = lookup(session, "CT_HUE_01")
        assert rec is not None
        assert (rec.host, rec.port, rec.facility, rec.check_host) == ("192.0.2.10", 104, "HUE", True)

        # its identity settings: believe the title from any host (then on again, as the later checks expect)
        for check in (False, True):
            row.get_by_role("link", name="Identity settings CT_HUE_01").click()
            page.wait_for_load_state("load")
            expect(page.locator("h1")).to_have_text("Identity settings of CT_HUE_01")
            if not check:
                assert axe(page) == []
                assert_keyboard_reachable(page)
            page.get_by_label("Check the calling host").set_checked(check)
            page.locator("#identity-form button[type=submit]").click()
            page.wait_for_load_state("load")
            expect(page.locator(".flash")).to_contain_text("Identity check of CT_HUE_01 saved.")
            with world.pacs.ctx.read_sessions() as session:
                changed = lookup(session, "CT_HUE_01")
            assert changed is not None and changed.check_host is check

        # remove another peer: a confirmation page first
        page.locator("#ae-table tbody tr", has_text="US_OLD_03").get_by_role("link", name="Remove US_OLD_03").click()
        page.wait_for_load_state("load")
        expect(page.locator("h1")).to_have_text("Remove US_OLD_03?")
        assert axe(page) == []
        assert_keyboard_reachable(page)
        page.locator("#remove-form button[type=submit]").click()
        page.wait_for_load_state("load")
        expect(page.locator(".flash")).to_contain_text("Removed US_OLD_03.")
        expect(page.locator("#ae-table tbody tr", has_text="US_OLD_03")).to_have_count(0)
        with world.pacs.ctx.read_sessions() as session:
            assert lookup(session, "US_OLD_03") is None

        # a forwarding rule to the new peer
        _sub_nav(page, "Forwarding")
        page.locator("#rule-form #f-name").fill("ct-to-hue")
        page.locator("#f-destination_ae").select_option("CT_HUE_01")
        page.locator("#rule-form #f-modality").fill("ct")
        page.locator("#rule-form button[type=submit]").click()
        page.wait_for_load_state("load")
        expect(page.locator("#rule-table tbody tr", has_text="ct-to-hue")).to_contain_text("CT_HUE_01")
        expect(page.locator("#rule-table tbody tr", has_text="ct-to-hue")).to_contain_text("CT")
        assert axe(page) == []
        assert_keyboard_reachable(page)

        # the audit trail: filter by action, the registration's row names the admin
        _sub_nav(page, "Audit trail")
        page.locator("#f-action").fill("config.ae-add")
        page.locator("#audit-filters button[type=submit]").click()
        page.wait_for_load_state("load")
        rows = page.locator("#audit-table tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first.locator(".audit-actor")).to_have_text(admin)
        expect(rows.first.locator(".audit-action")).to_have_text("config.ae-add")
        expect(rows.first.locator(".audit-detail")).to_contain_text("ae=CT_HUE_01 host=192.0.2.10:104")
        expect(page.locator("#f-action")).to_have_value("config.ae-add")
        screenshot(page, world.ui.screenshots / "admin-audit-ae.png", "config.ae-add", "CT_HUE_01", admin)
        page.locator("#verify-form button").click()
        page.wait_for_load_state("load")
        expect(page.locator("#verify-result")).to_contain_text("intact")
        assert axe(page) == []
        assert_keyboard_reachable(page)

        # a user, the generated password shown once
        _sub_nav(page, "Users")
        page.locator("#f-username").fill("ktv_hue_02")
        page.locator("#f-full_name").fill("Lê Thị Hoa")
        page.locator("#f-role").select_option("technologist")
        page.locator("#user-form #f-facility").fill("HOSP-A")
        page.locator("#user-form button[type=submit]").click()
        page.wait_for_load_state("load")
        password = page.locator("#new-password").inner_text()
        assert len(password) >= 10
        expect(page.locator("#user-table tbody tr", has_text="ktv_hue_02")).to_contain_text("Lê Thị Hoa")
        assert axe(page) == []
        assert_keyboard_reachable(page)
        # (the password reset page opens from the user's row; left without a change)
        page.get_by_role("link", name="Reset password ktv_hue_02").click()
        page.wait_for_load_state("load")
        expect(page.locator("h1")).to_have_text("Reset the password of ktv_hue_02")
        assert axe(page) == []
        assert_keyboard_reachable(page)
        page.locator("#password-form").get_by_role("link", name="Cancel").click()
        page.wait_for_load_state("load")

        # an API token: its secret shown once, right after it is made
        _sub_nav(page, "API tokens")
        page.locator("#token-form #f-name").fill("pacs-gateway-hue")
        page.locator("#f-token-role").select_option("emr")
        page.locator("#token-form #f-days").fill("30")
        page.locator("#token-form #f-facility").fill("HOSP-A")
        page.locator("#token-form button[type=submit]").click()
        page.wait_for_load_state("load")
        expect(page.locator("#token-created")).to_contain_text("Token pacs-gateway-hue created")
        secret = page.locator("#new-token").inner_text().strip()
        assert len(secret) >= 20
        expect(page.locator("#token-table tbody tr", has_text="pacs-gateway-hue")).to_contain_text("Active")
        assert axe(page) == []
        assert_keyboard_reachable(page)

        # revoke an API token (its secret is never shown in the list, nor the new one's again)
        _sub_nav(page, "API tokens")
        expect(page.locator("#new-token")).to_have_count(0)
        assert secret not in page.content()
        token_row = page.locator("#token-table tbody tr", has_text="emr-hue")
        expect(token_row).to_contain_text("Active")
        assert "pacs_" not in page.locator("#token-table").inner_text()
        token_row.get_by_role("button", name="Revoke emr-hue").click()
        page.wait_for_load_state("load")
        expect(page.locator(".flash")).to_contain_text("revoked")
        expect(page.locator("#token-table tbody tr", has_text="emr-hue")).to_contain_text("Revoked")
        assert axe(page) == []

        # a derived task that used up its attempts, retried from its row
        task_id = _fail_a_task(world)
        _sub_nav(page, "Failed tasks")
        failed_row = page.locator("#failed-table tbody tr", has_text="no space left on device")
        expect(failed_row).to_have_count(1)
        assert axe(page) == []
        assert_keyboard_reachable(page)
        failed_row.get_by_role("button", name=f"Retry task {task_id}").click()
        page.wait_for_load_state("load")
        expect(page.locator(".flash")).to_contain_text("1 failed tasks queued again.")
        expect(page.locator("#no-failed")).to_be_visible()
        with world.pacs.ctx.read_sessions() as session:
            retried = session.get(DerivedTask, task_id)
            assert retried is not None and retried.state != "failed" and retried.last_error == "", retried.state

        # storage: the two stored images, and the study due under the retention policy
        _sub_nav(page, "Storage")
        total = page.locator("#storage-table tfoot tr td")
        expect(total.nth(0)).to_have_text("1")
        expect(total.nth(1)).to_have_text("2")
        expect(total.nth(2)).to_contain_text("KiB")
        expect(page.locator("#retention-due")).to_contain_text("Studies due for deletion: 1.")
        assert axe(page) == []
        assert_keyboard_reachable(page)
        page.get_by_role("link", name="See the studies due").click()
        page.wait_for_load_state("load")
        expect(page.locator("h1")).to_have_text("Studies due for deletion")
        due = page.locator("table.data-table tbody tr")
        expect(due).to_have_count(1)
        expect(due.first).to_contain_text("Nguyễn Văn An")
        expect(due.first).to_contain_text("2010-03-15")
        expect(due.first.get_by_role("link")).to_have_attribute("href", f"/ui/studies/{world.study_uid}/manage")
        assert axe(page) == []
        assert_keyboard_reachable(page)

        # health: the object store gone, then back
        _sub_nav(page, "Health")
        expect(page.locator("main")).to_contain_text("Everything is working")
        objects = world.pacs.ctx.store.root
        away = objects.with_name(objects.name + "-away")
        objects.rename(away)
        try:
            page.reload()
            expect(page.locator("main")).to_contain_text("Something is not working")
            store_row = page.locator("main table.data-table tbody tr", has_text="Unavailable")
            expect(store_row).to_have_count(1)
            expect(store_row).to_contain_text("unavailable: StorageUnavailable")
            assert axe(page) == []
            assert_keyboard_reachable(page)
        finally:
            away.rename(objects)
        page.reload()
        expect(page.locator("main")).to_contain_text("Everything is working")

        _sub_nav(page, "Audit trail")
        page.locator("#f-action").fill("config.")
        page.locator("#audit-filters button[type=submit]").click()
        page.wait_for_load_state("load")
        screenshot(page, world.ui.screenshots / "admin-audit-config.png", "config.ae-add", "config.user-add",
                   "config.token-revoke", "config.forward-add")
        assert_clean(log)

    # each change is in the trail, by the signed-in administrator, from the browser's address
    for action in ("config.ae-add", "config.forward-add", "config.user-add", "config.token-revoke",
                   "config.token-create", "config.ae-remove", "tasks.retry", "retention.list"):
        rows_db = _audit_rows(world, action)
        assert [r["actor"] for r in rows_db] == [admin], (action, rows_db)
        assert rows_db[0]["role"] == "admin" and rows_db[0]["source_address"].startswith("127.0.0.1")
    assert [r["actor"] for r in _audit_rows(world, "config.ae-identity")] == [admin, admin]
    assert f"ids=[{task_id}] queued=1" in _audit_rows(world, "tasks.retry")[0]["detail"]
    with world.pacs.ctx.read_sessions() as session:
        revoked = session.get(ApiToken, world.token_id)
        assert revoked is not None and revoked.revoked_at is not None
        assert accounts.check_password(session, "ktv_hue_02", password) is not None


def test_admin_pages_in_vietnamese(world: World) -> None:
    with world.ui.browser_page("vi") as (page, _log):
        _sign_in(page, world, "admin")
        expect(page.locator("html")).to_have_attribute("lang", "vi")
        expect(page.locator("h1")).to_have_text("Quản trị")
        expect(page.locator("#health-summary")).to_contain_text("Mọi thứ đều hoạt động")
        _sub_nav(page, "Thiết bị DICOM")
        expect(page.locator("h1")).to_have_text("Thiết bị DICOM")
        # a form's errors, per field, in Vietnamese; nothing registered
        page.locator("#f-title").fill("SAI\\TEN")
        page.locator("#f-port").fill("99999")
        page.locator("#ae-form button[type=submit]").click()
        page.wait_for_load_state("load")
        expect(page.locator("#f-port-error")).to_have_text("Cổng là một số từ 1 đến 65535.")
        expect(page.locator("#f-title-error")).to_contain_text("AE title gồm 1 đến 16 ký tự")
        expect(page.locator("#f-host-error")).to_contain_text("Hãy nhập máy chủ")
        expect(page.locator("#f-port")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#f-title")).to_have_value("SAI\\TEN")  # what was typed stays in the form
        assert axe(page) == []
        for name, heading in (("Người dùng", "Người dùng"), ("Mã truy cập API", "Mã truy cập API"),
                              ("Chuyển tiếp", "Chuyển tiếp"), ("Tác vụ lỗi", "Công việc phát sinh"),
                              ("Lưu trữ", "Lưu trữ"), ("Nhật ký kiểm tra", "Nhật ký kiểm tra")):
            _sub_nav(page, name)
            expect(page.locator("h1")).to_have_text(heading)  # (axe: the English journey checks each page)
        screenshot(page, world.ui.screenshots / "admin-audit-vi.png", "Nhật ký kiểm tra", "Bộ lọc")
    with world.pacs.ctx.read_sessions() as session:
        assert lookup(session, "SAI\\TEN") is None


def test_refusals(world: World) -> None:
    """A technologist gets 403; a post without the CSRF token, or from another site, is refused; an administrator
    of one facility may read but not change the configuration (audited as a failure)."""
    base = world.base
    with world.ui.browser_page("en") as (page, _log):
        _sign_in(page, world, "technologist")
        response = page.goto(base + "/ui/admin/aes")
        assert response is not None and response.status == 403
        assert "ae-table" not in page.content()

    form: dict[str, str | float | bool] = {"title": "CT_EVIL", "host": "198.51.100.1", "port": "104",
                                           "facility": "HUE", "allow_store": "true", "check_host": "true"}
    with world.ui.browser_page("en") as (page, _log):
        _sign_in(page, world, "admin")
        _sub_nav(page, "DICOM peers")
        refused = page.request.post(base + "/ui/admin/aes", form=form, max_redirects=0)
        assert refused.status == 403
        token = page.locator("meta[name=csrf-token]").get_attribute("content") or ""
        cross = page.request.post(base + "/ui/admin/aes", form={**form, "csrf": token}, max_redirects=0,
                                  headers={"Origin": "http://evil.example"})
        assert cross.status == 403

    with world.ui.browser_page("en") as (page, _log):
        _sign_in(page, world, "hue_admin")
        if not page.url.rstrip("/").endswith("/ui/admin"):
            page.locator("nav.site-nav").get_by_role("link", name="Administration").click()
        _sub_nav(page, "DICOM peers")
        token = page.locator("meta[name=csrf-token]").get_attribute("content") or ""
        denied = page.request.post(base + "/ui/admin/aes", form={**form, "csrf": token}, max_redirects=0)
        assert denied.status == 403
        for listing in ("/ui/admin/users", "/ui/admin/tokens"):  # every facility's accounts, patients' included
            response = page.request.get(base + listing, max_redirects=0)
            assert response.status == 403, listing
            assert "rad_b" not in response.text(), listing
    with world.pacs.ctx.read_sessions() as session:
        assert lookup(session, "CT_EVIL") is None
    failures = [r for r in _audit_rows(world, "config.ae-add") if r["outcome"] == "failure"]
    assert [r["actor"] for r in failures] == ["hue_admin"], failures


def test_admin_actions_are_audited_in_process(world: World) -> None:
    """The core behind the pages, without a browser: each change audited with its actor, refusals too; an admin
    cannot disable their own account; the retries report how many jobs they queued."""
    admin = Principal(subject="it_lead", role=Role.ADMIN, capabilities=frozenset(Capability), kind="session",
                      source_address="10.0.0.9:5000")
    ctx = world.pacs.ctx
    with pytest.raises(InvalidInput):
        admin_actions.set_user_active(ctx, admin, "it_lead", False)
    admin_actions.add_ae(ctx, admin, admin_actions.AEForm("FWD_DEST", "192.0.2.20", 11112, facility="HOSP-A"))
    admin_actions.add_forward_rule(ctx, admin, admin_actions.RuleForm("all-to-dest", "FWD_DEST"))
    admin_actions.remove_forward_rule(ctx, admin, "all-to-dest")
    assert admin_actions.retry_forwarding(ctx, admin, "FWD_DEST") == 0
    assert admin_actions.retry_tasks(ctx, admin, None) == 0
    admin_actions.remove_ae(ctx, admin, "FWD_DEST")
    expected = {"config.user-disable": "failure", "config.ae-add": "success", "config.forward-add": "success",
                "config.forward-remove": "success", "forward.retry": "success", "tasks.retry": "success",
                "config.ae-remove": "success"}
    for action, outcome in expected.items():
        rows = [r for r in _audit_rows(world, action) if r["actor"] == "it_lead"]
        assert [r["outcome"] for r in rows] == [outcome], (action, rows)
        assert rows[0]["source_address"] == "10.0.0.9:5000"
