// Latchkey's passkeys page (/account/passkeys): sign in with a passkey, or with a
// password (and a second factor, if the account has one), then add passkeys.
//
// The access token lives in this script's memory only: never in storage, a cookie or the
// address bar, so reloading the page signs out of it (the session itself lives on until it
// expires or "Sign out" ends it). The refresh token is never kept. Every call goes to the
// JSON API with a relative URL and without cookies.
"use strict";

(function () {
  var GENERIC = "Something went wrong. Please try again in a moment.";
  var OFFLINE = "The server could not be reached. Check your connection and try again.";
  var UNSUPPORTED = "This browser cannot use passkeys. You can still sign in with your password here.";

  function $(id) {
    return document.getElementById(id);
  }

  var main = $("account");
  var status = $("status");
  if (!main || !status || main.getAttribute("data-page") !== "passkeys") return;

  var signedOut = $("signed-out");
  var signedIn = $("signed-in");
  var passkeySignIn = $("passkey-sign-in");
  var passwordForm = $("password-form");
  var email = $("email");
  var password = $("password");
  var mfaForm = $("mfa-form");
  var mfaPasskeyRow = $("mfa-passkey-row");
  var mfaPasskey = $("mfa-passkey");
  var mfaCodeRow = $("mfa-code-row");
  var mfaCode = $("mfa-code");
  var mfaCancel = $("mfa-cancel");
  var userEmail = $("user-email");
  var list = $("passkey-list");
  var none = $("no-passkeys");
  var addForm = $("add-form");
  var nameField = $("passkey-name");
  var addPassword = $("add-password");
  var addCode = $("add-code");
  var signOut = $("sign-out");

  var supported =
    window.isSecureContext &&
    typeof window.PublicKeyCredential === "function" &&
    !!navigator.credentials &&
    typeof navigator.credentials.create === "function";

  // Signed in: the access token (this variable is its only home). Halfway through a
  // login with a second factor: the ticket and the methods the account has.
  var accessToken = null;
  var ticket = null;
  var busy = false;

  function say(message, state) {
    status.setAttribute("data-state", state);
    status.textContent = message;
  }

  // --- base64url <-> bytes (WebAuthn's binary fields travel as base64url in JSON) ---

  function fromBase64url(text) {
    var base64 = String(text).replace(/-/g, "+").replace(/_/g, "/");
    while (base64.length % 4) base64 += "=";
    var binary = atob(base64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes.buffer;
  }

  function toBase64url(buffer) {
    var bytes = new Uint8Array(buffer);
    var binary = "";
    for (var i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    if (!Array.isArray(list)) return list;
    return list.map(function (d) {
      var copy = Object.assign({}, d);
      copy.id = fromBase64url(d.id);
      return copy;
    });
  }

  // The server's `options.publicKey`, with its binary fields as bytes. `mediation` (the
  // server offers conditional UI) is left out: this page asks when the button is pressed.
  function creationOptions(options) {
    var pk = Object.assign({}, options.publicKey);
    pk.challenge = fromBase64url(pk.challenge);
    pk.user = Object.assign({}, pk.user, { id: fromBase64url(pk.user.id) });
    if (pk.excludeCredentials) pk.excludeCredentials = descriptors(pk.excludeCredentials);
    return { publicKey: pk };
  }

  function requestOptions(options) {
    var pk = Object.assign({}, options.publicKey);
    pk.challenge = fromBase64url(pk.challenge);
    if (pk.allowCredentials) pk.allowCredentials = descriptors(pk.allowCredentials);
    return { publicKey: pk };
  }

  // The credential as webauthn-rs reads it (RegisterPublicKeyCredential / PublicKeyCredential).
  function registrationJson(credential) {
    var response = credential.response;
    var out = {
      clientDataJSON: toBase64url(response.clientDataJSON),
      attestationObject: toBase64url(response.attestationObject),
    };
    if (typeof response.getTransports === "function") out.transports = response.getTransports();
    return { id: credential.id, rawId: toBase64url(credential.rawId), type: credential.type, response: out, extensions: {} };
  }

  function assertionJson(credential) {
    var response = credential.response;
    return {
      id: credential.id,
      rawId: toBase64url(credential.rawId),
      type: credential.type,
      response: {
        clientDataJSON: toBase64url(response.clientDataJSON),
        authenticatorData: toBase64url(response.authenticatorData),
        signature: toBase64url(response.signature),
        userHandle: response.userHandle ? toBase64url(response.userHandle) : null,
      },
      extensions: {},
    };
  }

  // --- the API ---

  // Resolves to {status, body, response}; rejects (an "offline" error) only when the
  // server could not be reached.
  function api(method, path, body, token) {
    var headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = "Bearer " + token;
    return fetch("../" + path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    }).then(
      function (response) {
        if (response.status === 204) return { status: 204, body: null, response: response };
        return response.json().then(
          function (json) { return { status: response.status, body: json, response: response }; },
          function () { return { status: response.status, body: null, response: response }; }
        );
      },
      function () {
        var error = new Error(OFFLINE);
        error.offline = true;
        throw error;
      }
    );
  }

  function code(answer) {
    return answer.body && typeof answer.body.code === "string" ? answer.body.code : "";
  }

  function detail(answer) {
    return answer.body && typeof answer.body.detail === "string" ? answer.body.detail : "";
  }

  function retryLater(answer) {
    var seconds = parseInt(answer.response.headers.get("Retry-After") || "", 10);
    if (seconds > 0) {
      var minutes = Math.ceil(seconds / 60);
      return "Too many attempts. Try again in " + (minutes > 1 ? minutes + " minutes." : "a minute.");
    }
    return "Too many attempts. Try again later.";
  }

  // What to say for an answer no step expected; forgets a token the server refused.
  function unexpected(answer) {
    var c = code(answer);
    if (c === "rate_limited") return retryLater(answer);
    if (c === "service_unavailable") return "The server is busy. Please try again in a moment.";
    if (c === "not_found" && /passkey/i.test(detail(answer))) return "Passkeys are not enabled on this server.";
    if (c === "invalid_token" || c === "token_expired" || c === "token_revoked") {
      showSignedOut();
      return "Your session has ended. Please sign in again.";
    }
    return GENERIC;
  }

  // A failed navigator.credentials call, in words.
  function ceremonyError(error, registering) {
    var name = error && error.name;
    if (name === "NotAllowedError" || name === "AbortError") {
      return "The passkey request was cancelled or timed out. Nothing was changed.";
    }
    if (name === "InvalidStateError" && registering) {
      return "This device or security key already holds a passkey for your account.";
    }
    if (name === "SecurityError") {
      return "Passkeys cannot be used on this address. Open the page at the server's own address.";
    }
    if (name === "NotSupportedError") return "This device cannot create a suitable passkey.";
    return "Your browser could not use a passkey. Please try again.";
  }

  function ceremonyFailure(registering) {
    return function (error) {
      var wrapped = new Error(ceremonyError(error, registering));
      wrapped.shown = true;
      throw wrapped;
    };
  }

  // --- what the page shows ---

  function showSignedOut() {
    accessToken = null;
    ticket = null;
    signedIn.hidden = true;
    signedOut.hidden = false;
    mfaForm.hidden = true;
    passwordForm.hidden = false;
    passkeySignIn.hidden = !supported;
    if (mfaCode) mfaCode.value = "";
    if (list) list.textContent = "";
  }

  function showMfa(mfaToken, methods) {
    ticket = { token: mfaToken, methods: Array.isArray(methods) ? methods : [] };
    var passkey = supported && ticket.methods.indexOf("webauthn") >= 0;
    var codes = ticket.methods.indexOf("totp") >= 0 || ticket.methods.indexOf("recovery_code") >= 0;
    passwordForm.hidden = true;
    passkeySignIn.hidden = true;
    mfaPasskeyRow.hidden = !passkey;
    mfaCodeRow.hidden = !codes;
    mfaForm.hidden = false;
    if (!passkey && !codes) {
      say("Your account needs a second factor that this page cannot use. Sign in from your app instead.", "error");
      return;
    }
    say(
      passkey && codes
        ? "Use your passkey, or enter a code from your authenticator app."
        : passkey
          ? "Use your passkey to finish signing in."
          : "Enter the code from your authenticator app, or one of your recovery codes.",
      "info"
    );
    if (codes && !passkey && mfaCode) mfaCode.focus();
  }

  function renderList(passkeys) {
    list.textContent = "";
    passkeys.forEach(function (p) {
      var item = document.createElement("li");
      var name = document.createElement("span");
      name.className = "passkey-name";
      name.textContent = p.name;
      item.appendChild(name);
      var when = document.createElement("span");
      when.className = "hint";
      var added = new Date(p.created_at);
      var used = p.last_used_at ? new Date(p.last_used_at) : null;
      when.textContent =
        " — added " + added.toLocaleDateString() + (used ? ", last used " + used.toLocaleString() : ", not used yet");
      item.appendChild(when);
      list.appendChild(item);
    });
    list.hidden = passkeys.length === 0;
    none.hidden = passkeys.length !== 0;
  }

  function loadPasskeys() {
    return api("GET", "v1/users/me/passkeys", undefined, accessToken).then(function (answer) {
      if (answer.status !== 200 || !answer.body || !Array.isArray(answer.body.passkeys)) {
        throw shown(unexpected(answer));
      }
      renderList(answer.body.passkeys);
    });
  }

  function shown(message) {
    var error = new Error(message);
    error.shown = true;
    return error;
  }

  // A token response: keep the access token (only), show the account and its passkeys.
  function signIn(tokens) {
    if (!tokens || typeof tokens.access_token !== "string") throw shown(GENERIC);
    accessToken = tokens.access_token;
    ticket = null;
    if (password) password.value = "";
    if (mfaCode) mfaCode.value = "";
    return api("GET", "v1/users/me", undefined, accessToken)
      .then(function (answer) {
        if (answer.status !== 200 || !answer.body) throw shown(unexpected(answer));
        userEmail.textContent = answer.body.email;
        return loadPasskeys();
      })
      .then(
        function () {
          signedOut.hidden = true;
          signedIn.hidden = false;
          addForm.hidden = !supported;
        },
        function (error) {
          showSignedOut();
          throw error;
        }
      );
  }

  // Runs one step at a time; the page's buttons are disabled meanwhile.
  function step(work) {
    if (busy) return;
    busy = true;
    var buttons = main.querySelectorAll("button");
    Array.prototype.forEach.call(buttons, function (b) { b.disabled = true; });
    say("Working…", "busy");
    Promise.resolve()
      .then(work)
      .catch(function (error) {
        say(error && (error.shown || error.offline) ? error.message : GENERIC, "error");
      })
      .finally(function () {
        busy = false;
        Array.prototype.forEach.call(buttons, function (b) { b.disabled = false; });
      });
  }

  // --- the ceremonies ---

  function passkeyLogin() {
    return api("POST", "v1/auth/passkey/options", {})
      .then(function (answer) {
        if (answer.status !== 200 || !answer.body) throw shown(unexpected(answer));
        var challengeId = answer.body.challenge_id;
        say("Choose your passkey in the browser's window.", "busy");
        return navigator.credentials
          .get(requestOptions(answer.body.options))
          .catch(ceremonyFailure(false))
          .then(function (credential) {
            say("Checking your passkey…", "busy");
            return api("POST", "v1/auth/passkey", { challenge_id: challengeId, credential: assertionJson(credential) });
          });
      })
      .then(function (answer) {
        if (answer.status === 200) {
          return signIn(answer.body).then(function () {
            say("You are signed in with your passkey.", "success");
          });
        }
        if (code(answer) === "invalid_credentials") {
          throw shown("That passkey was not accepted. It may have been removed from your account: sign in with your password instead.");
        }
        if (code(answer) === "email_not_verified") {
          throw shown("Verify your email address first: we have sent you a new link.");
        }
        throw shown(unexpected(answer));
      });
  }

  function passwordLogin() {
    var body = { email: email.value.trim(), password: password.value };
    return api("POST", "v1/auth/login", body).then(function (answer) {
      if (answer.status === 200) {
        return signIn(answer.body).then(function () {
          say("You are signed in. Add a passkey below.", "success");
        });
      }
      var c = code(answer);
      if (c === "mfa_required" && answer.body && typeof answer.body.mfa_token === "string") {
        password.value = "";
        return showMfa(answer.body.mfa_token, answer.body.methods);
      }
      if (c === "invalid_credentials") throw shown("The email address or the password is not right.");
      if (c === "email_not_verified") throw shown("Verify your email address first: we have sent you a new link.");
      if (c === "validation_failed" && detail(answer)) throw shown(detail(answer));
      throw shown(unexpected(answer));
    });
  }

  // The second step: a finished ticket gives tokens; a dead one means starting again.
  function mfaAnswer(answer) {
    if (answer.status === 200) {
      return signIn(answer.body).then(function () {
        say("You are signed in with two steps.", "success");
      });
    }
    var c = code(answer);
    if (c === "invalid_mfa_code") {
      if (mfaCode) {
        mfaCode.value = "";
        mfaCode.focus();
      }
      throw shown("That was not accepted. Try again with the current code, or use another second factor.");
    }
    if (c === "invalid_token") {
      showSignedOut();
      throw shown("The sign-in took too long or was tried too often. Please sign in again.");
    }
    throw shown(unexpected(answer));
  }

  function mfaWithCode() {
    var value = mfaCode.value.replace(/\s+/g, "");
    if (!value) throw shown("Enter the code from your authenticator app, or a recovery code.");
    var methods = ticket.methods;
    var method = /^[0-9]{6}$/.test(value) && methods.indexOf("totp") >= 0 ? "totp" : "recovery_code";
    if (methods.indexOf(method) < 0) method = methods.indexOf("totp") >= 0 ? "totp" : "recovery_code";
    return api("POST", "v1/auth/mfa", { mfa_token: ticket.token, method: method, code: value }).then(mfaAnswer);
  }

  function mfaWithPasskey() {
    var mfaToken = ticket.token;
    return api("POST", "v1/auth/mfa/webauthn/options", { mfa_token: mfaToken })
      .then(function (answer) {
        if (answer.status !== 200 || !answer.body) return mfaAnswer(answer);
        say("Use your passkey in the browser's window.", "busy");
        return navigator.credentials
          .get(requestOptions(answer.body))
          .catch(ceremonyFailure(false))
          .then(function (credential) {
            return api("POST", "v1/auth/mfa", { mfa_token: mfaToken, method: "webauthn", credential: assertionJson(credential) });
          })
          .then(mfaAnswer);
      });
  }

  function addPasskey() {
    var name = nameField.value.trim();
    if (!name) {
      nameField.focus();
      throw shown("Give the passkey a name, so you can tell it from others later.");
    }
    var confirmWith = { current_password: addPassword.value };
    if (addCode.value.trim() !== "") confirmWith.code = addCode.value.trim();
    return api("POST", "v1/users/me/passkeys/options", confirmWith, accessToken)
      .then(function (answer) {
        if (code(answer) === "wrong_password") {
          addPassword.focus();
          throw shown("That is not your current password.");
        }
        if (code(answer) === "invalid_mfa_code") {
          addCode.focus();
          throw shown("Enter the current code from your authenticator app, or one of your recovery codes.");
        }
        if (answer.status !== 200 || !answer.body) throw shown(unexpected(answer));
        var challengeId = answer.body.challenge_id;
        say("Follow your browser's steps to create the passkey.", "busy");
        return navigator.credentials
          .create(creationOptions(answer.body.options))
          .catch(ceremonyFailure(true))
          .then(function (credential) {
            say("Saving your passkey…", "busy");
            var body = { challenge_id: challengeId, credential: registrationJson(credential), name: name };
            return api("POST", "v1/users/me/passkeys", body, accessToken);
          });
      })
      .then(function (answer) {
        if (answer.status === 201) {
          nameField.value = "";
          addPassword.value = "";
          addCode.value = "";
          return loadPasskeys().then(function () {
            say(
              "Your passkey \u201c" + name + "\u201d was added; your other sessions were signed out. Next time, sign in with it.",
              "success"
            );
          });
        }
        if (code(answer) === "validation_failed" && detail(answer)) throw shown(detail(answer));
        throw shown(unexpected(answer));
      });
  }

  function logout() {
    var token = accessToken;
    showSignedOut();
    return api("POST", "v1/auth/logout", undefined, token).then(
      function () { say("You are signed out.", "success"); },
      function () { say("You are signed out on this page; the server could not be told.", "error"); }
    );
  }

  // --- wiring ---

  passkeySignIn.addEventListener("click", function () { step(passkeyLogin); });
  passwordForm.addEventListener("submit", function (event) {
    event.preventDefault();
    step(passwordLogin);
  });
  mfaForm.addEventListener("submit", function (event) {
    event.preventDefault();
    if (ticket) step(mfaWithCode);
  });
  mfaPasskey.addEventListener("click", function () { if (ticket) step(mfaWithPasskey); });
  mfaCancel.addEventListener("click", function () {
    showSignedOut();
    say("", "");
  });
  addForm.addEventListener("submit", function (event) {
    event.preventDefault();
    if (accessToken) step(addPasskey);
  });
  signOut.addEventListener("click", function () { step(logout); });

  showSignedOut();
  if (!supported) say(UNSUPPORTED, "error");
})();
