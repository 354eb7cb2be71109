"""nginx's configuration for the appliance's one HTTPS origin, rendered from the settings model.

Tablets and laptops reach everything web through one TLS endpoint (HTTPS_PORT): Orthanc's REST
API and Explorer under `/orthanc/`, DICOMweb at `/dicom-web/`, later the viewer and the
dashboard. Every backend listens on loopback only; nginx is the one door. Plain HTTP
(HTTP_REDIRECT_PORT) only redirects, and hands out the site CA certificate so a tablet can be
taught to trust it.

Choices, for a 2 GB Pi on an SD card:
* TLS 1.2 and 1.3 only, forward-secret AEAD suites only (ECDHE with AES-GCM or ChaCha20), no
  session tickets (their key would outlive a restart's forward secrecy); HSTS for a year.
* request and response bodies stream through (`proxy_request_buffering off`,
  `proxy_buffering off`): a 500 MB study upload or download is never spooled to the SD card.
* one worker process, few connections: enough for a clinic, small in memory.
The same rendering serves `pacs run`, the tests and the appliance's nginx unit.
"""

from __future__ import annotations

import base64
import getpass
import os
import shutil
from pathlib import Path

from .. import durable
from ..config import Settings
from .tls import Outcome, SiteTLS, box_names

CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
])
HSTS_SECONDS = 365 * 86400
CA_DOWNLOAD = "/gotg-pacs-ca.crt"
# Headers every page gets: no framing, no sniffing, no referrer leaking study URLs.
SECURITY_HEADERS = {
    "Strict-Transport-Security": f"max-age={HSTS_SECONDS}",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Largest single request (a STOW-RS upload of a big study); bodies stream, nothing is buffered.
MAX_BODY = "4g"
# On the appliance (systemd, as root): workers run as Debian's www-data, which may not enter
# STATE_PATH, so their temporary files go where Debian's nginx keeps them, and the pid file to
# /run. `pacs run` and the tests run nginx as themselves, with everything in the proxy folder.
APPLIANCE_WORKER_USER = "www-data"
APPLIANCE_TEMP_ROOT = Path("/var/lib/nginx")
APPLIANCE_PID_FILE = Path("/run/nginx.pid")
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def config_file(settings: Settings) -> Path:
    return settings.proxy_dir / "nginx.conf"


def error_log(settings: Settings) -> Path:
    return settings.log_dir / "nginx-error.log"


def site_tls(settings: Settings) -> SiteTLS:
    return SiteTLS(settings.tls_dir, settings.site_code)


def _headers() -> list[str]:
    return [f'add_header {name} "{value}" always;' for name, value in SECURITY_HEADERS.items()]


def _ipv6() -> bool:
    """Whether this kernel has IPv6 (containers and some boxes turn it off): nginx refuses to
    start when asked to listen on an address family it lacks."""
    return Path("/proc/net/if_inet6").exists()


def _listen(port: int, *flags: str, local: bool = False) -> list[str]:
    """Every interface, or loopback only (`local`: no logins required, so nobody else may)."""
    tail = "".join(f" {flag}" for flag in flags) + ";"
    v4, v6 = ("127.0.0.1:", "[::1]:") if local else ("", "[::]:")
    return [f"listen {v4}{port}{tail}", *([f"listen {v6}{port}{tail}"] if _ipv6() else [])]


def _basic(settings: Settings) -> str:
    user, password = settings.orthanc_credentials or ("", "")
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _temp_root(settings: Settings, appliance: bool) -> Path:
    return APPLIANCE_TEMP_ROOT if appliance else settings.proxy_dir


def render(settings: Settings, ca_chain: str, appliance: bool = False, hq: bool = False) -> str:
    """nginx.conf as text. `ca_chain`: the site CA (PEM) handed out to tablets, written into the
    configuration so workers never read the TLS folder. `appliance`: run by systemd as root
    (see APPLIANCE_WORKER_USER). `hq`: HQ's origin, which also carries the clinics' uploads to
    the HQ receiver under `/sync/` (their HQ_URL is https://HQ/sync)."""
    user = APPLIANCE_WORKER_USER if appliance else getpass.getuser()
    tls, temp = settings.tls_dir, _temp_root(settings, appliance)
    pid = APPLIANCE_PID_FILE if appliance else settings.proxy_dir / "nginx.pid"
    if '"' in ca_chain or "\\" in ca_chain:
        raise ValueError("a PEM certificate never holds quotes or backslashes")
    orthanc = f"http://127.0.0.1:{settings.http_port}"
    redirect_port = "" if settings.https_port == 443 else f":{settings.https_port}"
    backend = [
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto https;",
        # Orthanc's DICOMweb builds the URLs in its answers from this (RFC 7239; Orthanc
        # takes the host unquoted).
        f'proxy_set_header Forwarded "proto=https;host=$host:{settings.https_port}";',
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_read_timeout 1h;",
        "proxy_send_timeout 1h;",
    ]
    ca_location = [
        f"location = {CA_DOWNLOAD} {{",
        "    default_type application/x-x509-ca-cert;",
        f'    return 200 "{ca_chain}";',
        "}",
    ]
    lines = [
        "# Rendered by pacs from pacs.env (web/nginx.py); changes here are overwritten.",
        *([f"user {user};"] if os.geteuid() == 0 else []),  # only root may name one
        "worker_processes 1;",
        f"pid {pid};",
        f"error_log {error_log(settings)} warn;",
        "events { worker_connections 256; }",
        "http {",
        "    include /etc/nginx/mime.types;",
        "    default_type application/octet-stream;",
        "    server_tokens off;",
        "    sendfile on;",
        *(f"    {kind}_temp_path {temp / kind};" for kind in TEMP_KINDS),
        f"    client_max_body_size {MAX_BODY};",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        f"    ssl_ciphers {CIPHERS};",
        "    ssl_prefer_server_ciphers off;",
        "    ssl_session_tickets off;",
        "    ssl_session_cache shared:gotg:1m;",
        "    ssl_session_timeout 1h;",
        # Guessing passwords: ten tries a minute per address, then 429 (accounts also lock).
        "    limit_req_zone $binary_remote_addr zone=logins:1m rate=10r/m;",
        "    limit_req_status 429;",
        # Who did what, for the audit trail: the signed-in person beside each request.
        "    log_format gotg '$remote_addr $pacs_user [$time_iso8601] \"$request\" $status "
        "$body_bytes_sent';",
        f"    access_log {settings.log_dir / 'nginx-access.log'} gotg;",
        # DICOMweb retrieval always in the stored encoding: asked to transcode (a transfer
        # syntax in Accept, or none, which means explicit little endian for frames), Debian
        # 12's Orthanc 1.10 with its DICOMweb plugin crashes often (segfaults in CharLS and
        # GDCM, seen here). A viewer decodes every stored syntax itself; no request may
        # bring the archive down.
        "    map $uri $pacs_dicomweb_accept {",
        "        default $http_accept;",
        "        ~/frames/[^/]+/?$ 'multipart/related; type=\"application/octet-stream\"; "
        "transfer-syntax=*';",
        "        ~^/dicom-web/studies/[^/]+(/series/[^/]+(/instances/[^/]+)?)?/?$ "
        "'multipart/related; type=\"application/dicom\"; transfer-syntax=*';",
        "    }",
        "",
    ]
    if settings.http_redirect_port:
        lines += [
            "    server {",
            *(f"        {line}" for line in _listen(settings.http_redirect_port,
                                                     local=not settings.enable_auth)),
            *(f"        {line}" for line in ca_location),
            f"        location / {{ return 301 https://$host{redirect_port}$request_uri; }}",
            "    }",
        ]
    web = f"http://127.0.0.1:{settings.web_api_port}"
    # Every request to a backend is first asked of the web service (its session, its role).
    guarded = [
        # The path as nginx routes it (decoded, dot segments resolved), kept for the check: the
        # subrequest's own $uri is /_auth, and the raw $request_uri is not what is routed.
        "set $pacs_path $uri;",
        "auth_request /_auth;",
        "auth_request_set $pacs_user $upstream_http_x_pacs_user;",
        "error_page 401 = @signin;",
    ] if settings.enable_auth else []
    to_orthanc = [
        *backend,
        # Users never hold Orthanc's credential: the origin adds it once they are let through.
        *([f'proxy_set_header Authorization "Basic {_basic(settings)}";']
          if settings.orthanc_credentials else []),
        'proxy_set_header X-HTTP-Method-Override "";',
    ]
    lines += [
        "    server {",
        *(f"        {line}" for line in _listen(settings.https_port, "ssl",
                                                 local=not settings.enable_auth)),
        f"        ssl_certificate {tls / 'server.crt'};",
        f"        ssl_certificate_key {tls / 'server.key'};",
        *(f"        {line}" for line in _headers()),
        *(f"        {line}" for line in ca_location),
        "        location = /_auth {",
        "            internal;",
        f"            proxy_pass {web}/auth/check;",
        "            proxy_pass_request_body off;",
        '            proxy_set_header Content-Length "";',
        "            proxy_set_header X-Original-URI $pacs_path;",
        "            proxy_set_header X-Original-Method $request_method;",
        "            proxy_set_header X-Real-IP $remote_addr;",
        "        }",
        # A browser is sent to the sign-in page; a program gets the 401 itself.
        "        location @signin {",
        '            if ($http_accept ~* "text/html") { return 302 /auth/login?next=$uri; }',
        "            return 401;",
        "        }",
        # Only nginx's own subrequest asks this (it writes the audit trail): never a client.
        "        location = /auth/check { return 404; }",
        "        location = /auth/login {",
        "            limit_req zone=logins burst=5 nodelay;",
        f"            proxy_pass {web};",
        "            proxy_set_header X-Real-IP $remote_addr;",
        "        }",
        "        location /auth/ {",
        f"            proxy_pass {web};",
        "            proxy_set_header X-Real-IP $remote_addr;",
        "        }",
        "        location /api/ {",
        *(f"            {line}" for line in guarded),
        f"            proxy_pass {web};",
        "            proxy_set_header X-Real-IP $remote_addr;",
        "        }",
        # Until the viewer arrives, Orthanc Explorer is the front page.
        "        location = / { return 302 /orthanc/app/explorer.html; }",
        # The same transcoding reached through Orthanc's REST API: archives and media with
        # ?transcode=, WADO-URI with transferSyntax=, its DICOMweb under its own prefix.
        "        location /orthanc/dicom-web/ { return 403; }",
        "        location /orthanc/ {",
        '            if ($args ~* "(^|&)(transcode|transfersyntax)=") { return 403; }',
        *(f"            {line}" for line in guarded),
        f"            proxy_pass {orthanc}/;",
        *(f"            {line}" for line in to_orthanc),
        "        }",
        "        location /dicom-web/ {",
        *(f"            {line}" for line in guarded),
        f"            proxy_pass {orthanc}/dicom-web/;",
        *(f"            {line}" for line in to_orthanc),
        "            proxy_set_header Accept $pacs_dicomweb_accept;",
        "        }",
        # The clinics' uploads prove themselves with their own site token (hq/sites.py).
        *([
            "        location /sync/ {",
            f"            proxy_pass http://127.0.0.1:{settings.hq_receiver_port}/;",
            *(f"            {line}" for line in backend),
            "        }",
        ] if hq else []),
        "    }",
        "}",
    ]
    return "\n".join(line for line in lines if line != "") + "\n"


def write(settings: Settings, ca_chain: str, appliance: bool = False, hq: bool = False) -> Path:
    """Render to the proxy folder, with nginx's temporary folders made where it looks."""
    path = config_file(settings)
    settings.proxy_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = _temp_root(settings, appliance)
    for kind in TEMP_KINDS:
        (temp / kind).mkdir(parents=True, exist_ok=True, mode=0o700)
        if appliance:
            shutil.chown(temp / kind, APPLIANCE_WORKER_USER)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    durable.replace_text(path, render(settings, ca_chain, appliance, hq), mode=0o644)
    return path


def prepare(settings: Settings, appliance: bool = False,
            hq: bool = False) -> tuple[Path, Outcome]:
    """Before nginx starts, under `pacs run` or systemd alike: the site's CA and a server
    certificate for the box's current names (made or renewed), then the configuration."""
    tls = site_tls(settings)
    outcome = tls.ensure(box_names(settings.server_names))
    return write(settings, tls.ca_chain_file.read_text(), appliance, hq), outcome
