"""A team's MLflow tracking server with logins and roles: `python -m pipeline.team --help`.

MLflow's basic-auth app (`mlflow server --app-name basic-auth`) checks every request against users
and per-resource permissions. Three roles cover vamos's promotion path:

- `vamos-pipeline`, the service account of the scheduled runs: creates the experiment and the
  registered models, logs runs, registers versions and sets `challenger`, and `champion` through
  the promotion rule (`register`);
- `vamos-release-manager`: moves `champion` by hand, in the UI or the API; deletes nothing;
- `vamos-reader`: sees runs, models and versions; changes nothing.

The server runs with workspaces (`--enable-workspaces`), the only way MLflow has to keep creation
to some: without them, any login may create experiments and registered models and manages what it
creates, so a reader could take `vamos-<pair>`'s name before the pipeline's first register. With
them, only a workspace-wide USE grant creates, and only the pipeline's role has one. The server's
default permission is NO_PERMISSIONS, so a user without a role sees nothing.
MLflow's permissions are per experiment and registered model, not per alias: whoever may edit a
registered model may move any of its aliases. So the pipeline's own credentials can move
`champion` without the rule; keep them only where the scheduled runs start (the Prefect worker's
environment). docs/team.md says what else is left open and how to close it.

No password is ever written to the repository: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD
when the server first starts, and each user's is generated here into a file of its own (mode 0600)
under --secrets, outside the checkout."""
from __future__ import annotations

import configparser
import io
import secrets
from pathlib import Path

import typer

from pipeline import storage

WORKSPACE = "default"  # the workspace that clients which name none (vamos, MLflow's client) use
EDIT, READ, USE = "EDIT", "READ", "USE"
PIPELINE, RELEASE_MANAGER, READER = "vamos-pipeline", "vamos-release-manager", "vamos-reader"
# role -> {resource type: permission on every resource of the type ("*")}; "workspace": USE is
# what lets a role create experiments and registered models.
ROLES: dict[str, dict[str, str]] = {
    PIPELINE: {"workspace": USE, "experiment": EDIT, "registered_model": EDIT},
    RELEASE_MANAGER: {"experiment": READ, "registered_model": EDIT},
    READER: {"experiment": READ, "registered_model": READ},
}
DEFAULT_SECRETS = Path("~/.config/vamos/mlflow-users")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


def auth_config(auth_db: str, admin: str = "admin") -> str:
    """The basic-auth app's config (MLFLOW_AUTH_CONFIG_PATH): no password in it."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",  # a user without a role sees nothing
        "database_uri": auth_db,
        "admin_username": admin,  # created at the first start, with MLFLOW_AUTH_ADMIN_PASSWORD
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (mode 0600 from its creation on), whole or not at all."""
    with storage.atomic_path(path, mode=0o600) as tmp:
        tmp.write_text(text, encoding="utf-8")


def user_password(secrets_dir: Path, user: str) -> str:
    """The user's password: the one in its file if there is one, else a new one saved there
    first, so that a rerun after a failure uses the same."""
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = secrets_dir / user
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(24)
    write_private(path, password + "\n")
    return password


def ensure_role(auth, name: str, grants: dict[str, str]) -> int:
    """The role's id, created or completed with its grants; an existing grant of another level is
    set to this one."""
    role = next((r for r in auth.list_roles(WORKSPACE) if r.name == name), None)
    if role is None:
        role = auth.create_role(WORKSPACE, name, description="vamos: pipeline/team.py")
    held = {(p.resource_type, p.resource_pattern): p for p in auth.list_role_permissions(role.id)}
    for resource_type, permission in grants.items():
        existing = held.get((resource_type, "*"))
        if existing is None:
            auth.add_role_permission(role.id, resource_type, "*", permission)
        elif existing.permission != permission:
            auth.update_role_permission(existing.id, permission)
    return role.id


def ensure_user(auth, user: str, role_id: int, vamos_roles: dict[int, str], secrets_dir: Path) -> bool:
    """Create the user (if new) and give it the role, taking away any other vamos role (a reader
    made release manager stops being a reader); True if the user was created."""
    from mlflow.exceptions import RestException

    try:
        auth.get_user(user)  # an existing user keeps the password it has
        created = False
    except RestException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # a server error must not look like a new user
            raise
        auth.create_user(user, user_password(secrets_dir, user))
        created = True
    held = {r.id for r in auth.list_user_roles(user)}
    for other in held & vamos_roles.keys() - {role_id}:
        auth.unassign_role(user, other)
    if role_id not in held:
        auth.assign_role(user, role_id)
    return created


def set_up_roles(tracking_uri: str, members: dict[str, list[str]], secrets_dir: Path) -> dict[str, list[str]]:
    """Roles and users on a running basic-auth server, as its admin (MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD); idempotent. Returns {role: [users created now]}."""
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    role_ids = {role: ensure_role(auth, role, grants) for role, grants in ROLES.items()}
    vamos_roles = {role_id: role for role, role_id in role_ids.items()}
    return {role: [user for user in users if ensure_user(auth, user, role_ids[role], vamos_roles, secrets_dir)]
            for role, users in members.items()}


@app.command("mlflow-config")
def mlflow_config(path: Path = typer.Argument(..., help="where to write the config (outside the checkout)"),
                  auth_db: str = typer.Option(..., help="the users' database, e.g. sqlite:////srv/mlflow/auth.db "
                                                        "or postgresql://mlflow@db-host/mlflow_auth"),
                  admin: str = typer.Option("admin", help="the admin's user name")) -> None:
    """Write the basic-auth app's config (mode 0600: its database URI may hold a password); start
    the server with MLFLOW_AUTH_CONFIG_PATH set to it."""
    write_private(path, auth_config(auth_db, admin))
    typer.echo(f"wrote {path}: start the server with --enable-workspaces, MLFLOW_AUTH_CONFIG_PATH={path}, "
               "MLFLOW_AUTH_ADMIN_PASSWORD (first start only) and MLFLOW_FLASK_SERVER_SECRET_KEY in its environment")


@app.command("mlflow-roles")
def mlflow_roles(tracking_uri: str = typer.Option(..., envvar="MLFLOW_TRACKING_URI", help="the server"),
                 pipeline: list[str] = typer.Option([], help="the service account of the scheduled runs"),
                 release_manager: list[str] = typer.Option([], help="may move champion by hand (repeat)"),
                 reader: list[str] = typer.Option([], help="sees everything, changes nothing (repeat)"),
                 secrets_dir: Path = typer.Option(DEFAULT_SECRETS, "--secrets",
                                                  help="new users' passwords go here, one file each (0600)")) -> None:
    """Create the three roles and the named users (as the admin: MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD). Run it again to add users; existing ones keep their passwords."""
    secrets_dir = secrets_dir.expanduser()
    members = {PIPELINE: pipeline, RELEASE_MANAGER: release_manager, READER: reader}
    named = [user for users in members.values() for user in set(users)]
    if twice := sorted({user for user in named if named.count(user) > 1}):
        raise typer.BadParameter(f"a user has one vamos role, but {', '.join(twice)} is named for two")
    created = set_up_roles(tracking_uri, members, secrets_dir)
    for role, users in members.items():
        for user in users:
            state = "created" if user in created[role] else "exists"
            where = f"password in {secrets_dir / user}" if state == "created" else "password unchanged"
            typer.echo(f"{role}: {user} ({state}; {where})")


if __name__ == "__main__":
    from pipeline.tracking import offline_environment

    offline_environment()
    app()
