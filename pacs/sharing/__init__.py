"""Share links (issue 14): an unguessable, expiring, revocable link to one study's report — optionally with its
key images, or the whole study for a doctor — that opens without login at ``/s/{token}``.

- :mod:`pacs.sharing.models`: the ``share_link`` table (only the SHA-256 of a token is stored);
- :mod:`pacs.sharing.links`: create, list, revoke and open links; the errors an open can end in;
- :mod:`pacs.sharing.throttle`: the per-address throttle of failed opens (in memory, before any database work);
- :mod:`pacs.sharing.content`: what an opened link shows (report text, PDF, key images as phone-sized JPEGs)
  and the signed cookie that remembers a correct birth date.

A link's principal sees exactly its one study (``AccessScope(study_uids={uid})``); every open is audited with
the link's id, never its token.
"""
