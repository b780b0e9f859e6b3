"""``/api/auth``: log in with a user name and password for a short-lived session token; who am I."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from pacs.security.login import LoginRefused, WrongCredentials, password_login
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
                        429: {"description": "Too many failed attempts; see Retry-After"},
                        503: {"description": "Too many password checks at once; see Retry-After"}})
def login(body: LoginRequest, request: Request) -> TokenResponse:
    host = request.client.host if request.client else ""
    try:
        user = password_login(context(request), request.app.state.login_guard, body.username, body.password,
                              host=host, address=client_address(request))
    except LoginRefused as exc:
        code = "too_many_attempts" if exc.status == 429 else "busy"
        message = "too many login attempts; try again later" if exc.status == 429 else str(exc)
        raise ApiError(exc.status, code, message, {"Retry-After": str(exc.retry_after)}) from None
    except WrongCredentials:
        raise ApiError(401, "unauthenticated", "wrong user name or password", {"WWW-Authenticate": "Bearer"}) from None
    token, ttl = request.app.state.authenticator.issue_session_token(user)
    return TokenResponse(access_token=token, expires_in=ttl, role=user.role)


@router.get("/me", response_model=Me, summary="The identity behind the bearer token")
async def me(principal: Principal = require(None)) -> Me:  # noqa: B008
    return Me(subject=principal.subject, role=principal.role.value, kind=principal.kind,
              facility=principal.facility, capabilities=sorted(c.value for c in principal.capabilities))

