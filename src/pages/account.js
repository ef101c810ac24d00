// Latchkey's account pages (verify-email, reset-password, confirm-email).
//
// A mailed link carries a one-time token in its fragment (#token=…), which browsers never
// send to a server. This script reads it, removes it from the address bar and the history
// at once, and sends it only when the person presses the button: opening the page (a
// mail scanner, a link preview, even one that runs scripts) changes nothing.
"use strict";

(function () {
  var ENDPOINTS = {
    "verify-email": "../v1/auth/verify-email",
    "reset-password": "../v1/auth/password/reset",
    "confirm-email": "../v1/auth/confirm-email",
  };
  var DONE = {
    "verify-email": "Your email address is verified. You can close this page.",
    "reset-password": "Your password was changed; every session was signed out. You can now sign in.",
    "confirm-email": "Your new email address is confirmed. Use it to sign in from now on.",
  };
  var INVALID = "This link is invalid, expired or already used — ask for a new one.";
  var INCOMPLETE =
    "This link is incomplete. Open the whole link from the mail again, or copy all of it into the address bar.";
  var GENERIC = "Something went wrong. Please try again in a moment.";
  var OFFLINE = "The server could not be reached. Check your connection and try again.";

  var main = document.getElementById("account");
  var form = document.getElementById("form");
  var status = document.getElementById("status");
  var button = document.getElementById("submit");
  if (!main || !form || !status || !button) return;
  var page = main.getAttribute("data-page");
  var endpoint = ENDPOINTS[page];
  if (!endpoint) return;

  // The token, then the fragment gone for good: not in the address bar, not in history.
  var token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (window.location.hash) {
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  function say(message, state) {
    status.setAttribute("data-state", state);
    status.textContent = message;
  }

  if (!token) {
    say(INCOMPLETE, "error");
    return;
  }
  form.hidden = false;

  var password = document.getElementById("new-password");
  var confirmation = document.getElementById("confirm-password");
  var mfaCode = document.getElementById("mfa-code");
  var busy = false;

  function finish(message, state) {
    token = null;
    if (password) password.value = "";
    if (confirmation) confirmation.value = "";
    form.hidden = true;
    say(message, state);
  }

  function retryLater(response) {
    var seconds = parseInt(response.headers.get("Retry-After") || "", 10);
    if (seconds > 0) {
      var minutes = Math.ceil(seconds / 60);
      return "Too many attempts. Try again in " + (minutes > 1 ? minutes + " minutes." : "a minute.");
    }
    return "Too many attempts. Try again later.";
  }

  function answer(response, problem) {
    if (response.status === 204) return finish(DONE[page], "success");
    var code = problem && typeof problem.code === "string" ? problem.code : "";
    var detail = problem && typeof problem.detail === "string" ? problem.detail : "";
    if (code === "invalid_one_time_token") return finish(INVALID, "error");
    if ((code === "weak_password" || code === "validation_failed") && detail) {
      say(detail, "error");
      if (password) password.focus();
      return;
    }
    if (code === "rate_limited") return say(retryLater(response), "error");
    if (code === "invalid_mfa_code") {
      say("Your account has two-step sign-in: enter the current code from your authenticator app, or one of your recovery codes.", "error");
      if (mfaCode) mfaCode.focus();
      return;
    }
    say(GENERIC, "error");
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (busy || !token) return;
    var body = { token: token };
    if (password && confirmation) {
      if (password.value !== confirmation.value) {
        confirmation.setAttribute("aria-invalid", "true");
        say("The two passwords are not the same.", "error");
        confirmation.focus();
        return;
      }
      confirmation.removeAttribute("aria-invalid");
      body.new_password = password.value;
      if (mfaCode && mfaCode.value.trim() !== "") body.code = mfaCode.value.trim();
    }
    busy = true;
    button.disabled = true;
    say("Sending…", "busy");
    fetch(endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    })
      .then(function (response) {
        if (response.status === 204) return answer(response, null);
        return response.json().then(
          function (problem) { answer(response, problem); },
          function () { answer(response, null); }
        );
      })
      .catch(function () { say(OFFLINE, "error"); })
      .finally(function () {
        busy = false;
        button.disabled = false;
      });
  });
})();
