"""The appliance's web service (`pacs-web`, loopback only, behind nginx): logins, sessions, the
check nginx makes before every request to a backend, accounts, and marking a study urgent.

nginx sends `/auth/check` the method and path of each request (`auth_request`); the answer is
200 with the person's name and role, 401 without a live session, 403 when the role may not do
that (`policy`) or the password must be changed first. Pages here are rendered by Jinja with
autoescaping: nothing a person or a DICOM header typed is ever inserted as HTML.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, g, jsonify, redirect, render_template_string, request

from .. import durable
from ..audit import AuditLog, action_of
from ..config import Settings
from . import policy
from .users import (
    ADMIN_CHANGED_MARKER,
    MIN_PASSWORD,
    ROLES,
    LoginRefused,
    Session,
    UserError,
    Users,
)

COOKIE = "pacs_session"
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ site }} - sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font:18px sans-serif;max-width:24em;margin:3em auto;padding:0 1em}
input,button{font-size:1.2em;width:100%;margin:.4em 0;padding:.6em;box-sizing:border-box}
.error{color:#a00}</style></head>
<body><h1>{{ site }}</h1>
{% if error %}<p class="error">{{ error }}</p>{% endif %}
{% if change %}
<form method="post" action="/auth/password">
<p>Choose your own password (at least {{ minimum }} characters) before going on.</p>
<input type="password" name="old" placeholder="Current password"
 autocomplete="current-password" required>
<input type="password" name="new" placeholder="New password"
 autocomplete="new-password" required>
<button>Change password</button></form>
{% else %}
<form method="post" action="/auth/login">
<input name="user" placeholder="Name" autocomplete="username" required autofocus>
<input type="password" name="password" placeholder="Password"
 autocomplete="current-password" required>
<input type="hidden" name="next" value="{{ next }}">
<button>Sign in</button></form>
{% endif %}
</body></html>
"""
log = logging.getLogger("pacs.web")


def _safe_next(target: str | None) -> str:
    """Only a path on this origin: never an open redirect to another site."""
    if target and re.fullmatch(r"/(?![/\\])[\x21-\x7e]*", target):
        return target
    return "/"


def _clean(path: str) -> str | None:
    """The path nginx asks about, refused if it still holds dot segments or empty ones."""
    path = path.split("?", 1)[0]
    if not path.startswith("/") or "//" in path or re.search(r"/\.\.?(/|$)", path):
        return None
    return path


def create_app(settings: Settings, users: Users | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    store = users or Users.from_settings(settings)
    audit = AuditLog(settings.audit_file)
    if settings.enable_auth and store.bootstrap_admin(settings.admin_password):
        log.info("made the admin account from ADMIN_PASSWORD; it must be changed at first "
                 "login")

    def wants_json() -> bool:
        """Programs get JSON; a browser (asking for HTML) gets pages and redirects."""
        return request.is_json or "text/html" not in request.headers.get("Accept", "")

    def current() -> Session | None:
        if "session" not in g:
            g.session = store.session(request.cookies.get(COOKIE, ""))
        return g.session

    def page(error: str = "", change: bool = False, status: int = 200) -> Response:
        html = render_template_string(LOGIN_PAGE, site=settings.pacs_name, error=error,
                                      change=change, minimum=MIN_PASSWORD,
                                      next=_safe_next(request.values.get("next")))
        return Response(html, status, content_type="text/html; charset=utf-8")

    @app.after_request
    def no_caching(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/auth/check")
    def check() -> Response:
        if not settings.enable_auth:
            return Response(status=200, headers={"X-Pacs-User": "-", "X-Pacs-Role": "admin"})
        path = _clean(request.headers.get("X-Original-URI", ""))
        method = request.headers.get("X-Original-Method", "GET")
        session = current()
        if session is None:
            return Response(status=401)
        if path is None or session.must_change:
            return Response(status=403, headers={"X-Pacs-Reason": "password-change-required"
                                                 if session.must_change else "bad-path"})
        address = request.headers.get("X-Real-IP", "?")
        if not policy.allowed(session.role, method, path):
            log.info("denied %s %s to %s (%s) from %s", method, path, session.name,
                     session.role, address)
            audit.record("denied", session.name, address, role=session.role, method=method,
                         path=path)
            return Response(status=403)
        done = action_of(method, path)
        if done:
            audit.record(done[0], session.name, address, role=session.role, kind=done[1],
                         resource=done[2])
        return Response(status=200, headers={"X-Pacs-User": session.name,
                                             "X-Pacs-Role": session.role})

    @app.get("/auth/login")
    def login_page() -> Response:
        session = current()
        return page(change=bool(session and session.must_change))

    @app.post("/auth/login")
    def login() -> Response:
        body = request.get_json(silent=True) if request.is_json else request.form
        body = body if isinstance(body, dict) or hasattr(body, "get") else {}
        name, password = str(body.get("user", ""))[:64], str(body.get("password", ""))[:256]
        address = request.headers.get("X-Real-IP", request.remote_addr or "?")
        try:
            token, session = store.login(name, password, address)
        except LoginRefused as exc:
            log.info("login refused for %r from %s: %s", name, address, exc)
            audit.record("login-refused", name, address, reason=str(exc))
            if wants_json():
                return jsonify({"error": str(exc)}), 401
            return page(error=str(exc), status=401)
        log.info("login %s (%s) from %s", session.name, session.role, address)
        audit.record("login", session.name, address, role=session.role)
        answer = (jsonify({"user": session.name, "role": session.role,
                           "must_change_password": session.must_change})
                  if wants_json() else redirect(
                      "/auth/login" if session.must_change
                      else _safe_next(request.values.get("next")), 303))
        answer.set_cookie(COOKIE, token, httponly=True, secure=True, samesite="Strict",
                          path="/")
        return answer

    @app.post("/auth/logout")
    def logout() -> Response:
        everywhere = request.args.get("everywhere") == "1" or request.form.get("everywhere")
        session = current()
        if session is None and wants_json():
            return jsonify({"error": "not signed in"}), 401
        ended = store.logout(request.cookies.get(COOKIE, ""), bool(everywhere))
        if session and ended:
            audit.record("logout", session.name, request.headers.get("X-Real-IP", "?"),
                         sessions=str(ended))
        answer = jsonify({"ended": ended}) if wants_json() else redirect("/auth/login", 303)
        answer.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return answer

    @app.post("/auth/password")
    def change_password() -> Response:
        session = current()
        if session is None:
            return (jsonify({"error": "not signed in"}), 401) if wants_json() else page(
                error="Sign in first.", status=401)
        body = request.get_json(silent=True) if request.is_json else request.form
        body = body if hasattr(body, "get") else {}
        try:
            store.change_password(session.name, str(body.get("old", "")),
                                  str(body.get("new", "")), request.cookies.get(COOKIE, ""))
        except UserError as exc:
            return (jsonify({"error": str(exc)}), 400) if wants_json() else page(
                error=str(exc), change=True, status=400)
        log.info("%s changed their password", session.name)
        audit.record("password-changed", session.name, request.headers.get("X-Real-IP", "?"))
        if session.name == "admin" and session.must_change:
            durable.write_bytes(settings.state_path / ADMIN_CHANGED_MARKER, b"")
        return jsonify({"changed": True}) if wants_json() else redirect("/", 303)

    @app.get("/auth/me")
    def me() -> Response:
        session = current()
        if session is None:
            return jsonify({"error": "not signed in"}), 401
        return jsonify({"user": session.name, "role": session.role,
                        "must_change_password": session.must_change})

    # --- the appliance's own API (nginx has asked /auth/check first) ------------------------

    def acting() -> Session | None:
        session = current()
        if session is None or session.must_change:
            return None
        if not policy.allowed(session.role, request.method, request.path):
            return None
        return session

    @app.get("/api/users")
    def users_list() -> Response:
        if acting() is None:
            return jsonify({"error": "forbidden"}), 403
        return jsonify(store.list())

    @app.post("/api/users")
    def users_add() -> Response:
        session = acting()
        if session is None:
            return jsonify({"error": "forbidden"}), 403
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or body.get("role") not in ROLES:
            return jsonify({"error": f"give a name and a role ({', '.join(ROLES)})"}), 400
        try:
            password = store.add(str(body.get("name", "")), body["role"])
        except UserError as exc:
            return jsonify({"error": str(exc)}), 400
        log.info("%s added account %s (%s)", session.name, body["name"], body["role"])
        audit.record("account-added", session.name, request.headers.get("X-Real-IP", "?"),
                     account=str(body["name"]), role=str(body["role"]))
        return jsonify({"name": body["name"], "role": body["role"],
                        "one_time_password": password}), 201

    @app.get("/api/audit")
    def audit_trail() -> Response:
        if acting() is None:
            return jsonify({"error": "forbidden"}), 403
        from ..audit import read, verify

        try:
            offset = int(request.args.get("since", "0"))
            if not 0 <= offset < 2**62:
                raise ValueError
        except ValueError:
            return jsonify({"error": "since is a byte offset"}), 400
        events, end = read(settings.audit_file, offset)
        return jsonify({"events": events[-1000:], "next": end,
                        "chain": verify(events) if offset == 0 else None})

    @app.post("/api/studies/<study_uid>/urgent")
    def urgent(study_uid: str) -> Response:
        session = acting()
        if session is None:
            return jsonify({"error": "forbidden"}), 403
        from ..orthanc import Orthanc
        from ..sync.outbox import Outbox, mark_urgent

        if not re.fullmatch(r"[0-9.]{1,64}|[0-9a-f-]{44}", study_uid):
            return jsonify({"error": "not a Study Instance UID"}), 400
        with Outbox(settings.sync_outbox_file) as outbox:
            found = mark_urgent(outbox, Orthanc.from_settings(settings), study_uid)
        if not found:
            return jsonify({"error": "no such study here"}), 404
        log.info("%s marked study %s urgent", session.name, study_uid)
        audit.record("mark-urgent", session.name, request.headers.get("X-Real-IP", "?"),
                     kind="studies", resource=study_uid)
        return jsonify({"study": study_uid, "urgent": True})

    return app
