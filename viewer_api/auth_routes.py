"""``/api/auth``: log in with a user name and password for a short-lived session token; who am I."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from pacs import audit
from pacs.security.accounts import check_password
from pacs.security.principal import Principal
from viewer_api.errors import ApiError
from viewer_api.security import client_address, context, require

router = APIRouter(prefix="/api/auth", tags=["auth"])


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    role: str


class Me(BaseModel):
    subject: str
    role: str
    kind: str
    facility: str
    capabilities: list[str]


@router.post("/login", response_model=TokenResponse, summary="Log in; returns a short-lived bearer token",
             responses={401: {"description": "Wrong user name or password"},
                        429: {"description": "Too many attempts; see Retry-After"}})
def login(body: LoginRequest, request: Request) -> TokenResponse:
    ctx = context(request)
    limiter = request.app.state.login_limiter
    address = client_address(request)
    host = request.client.host if request.client else ""
    # Failed attempts are counted per user name from one address (the tight limit), and, with 5× more room,
    # per user name from anywhere and per address (a hospital's clients may share one NAT address): a
    # guesser elsewhere slows down, but cannot lock the user out of their own workstation at once.
    name = body.username.lower()
    keys = (f"user:{name}|{host}", f"user:{name}", f"addr:{host}")
    limiters = (limiter, request.app.state.user_limiter, request.app.state.address_limiter)
    for key, limit in zip(keys, limiters, strict=True):
        if limit.limited(key):
            audit.record(ctx.sessions, action="auth.login", actor=body.username, outcome="failure",
                         source_address=address, detail="rate limited")
            raise ApiError(429, "too_many_attempts", "too many login attempts; try again later",
                           {"Retry-After": str(limit.retry_after(key))})
    with ctx.read_sessions() as session:
        user = check_password(session, body.username, body.password)
    if user is None:
        for key, limit in zip(keys, limiters, strict=True):
            limit.hit(key)
        audit.record(ctx.sessions, action="auth.login", actor=body.username, outcome="failure",
                     source_address=address, detail="wrong user name or password")
        raise ApiError(401, "unauthenticated", "wrong user name or password", {"WWW-Authenticate": "Bearer"})
    token, ttl = request.app.state.authenticator.issue_session_token(user)
    audit.record(ctx.sessions, action="auth.login", actor=user.username, role=user.role, source_address=address)
    return TokenResponse(access_token=token, expires_in=ttl, role=user.role)


@router.get("/me", response_model=Me, summary="The identity behind the bearer token")
async def me(principal: Principal = require(None)) -> Me:  # noqa: B008
    return Me(subject=principal.subject, role=principal.role.value, kind=principal.kind,
              facility=principal.facility, capabilities=sorted(c.value for c in principal.capabilities))

