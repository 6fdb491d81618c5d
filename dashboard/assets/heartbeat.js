// The page's side of the heartbeat (dashboard/app.py, HEARTBEAT_MS): these run in the browser, so they
// keep working when the server does not answer. Dash loads every file in assets/.
window.dash_clientside = Object.assign({}, window.dash_clientside, {
    sinkscope: {
        // An answer came back from the server: note when (the browser's clock: no skew with the server's).
        beatSeen: function (_beat) {
            return Date.now();
        },
        // Between answers: say so once the server has been quiet for longer than `silentMs`.
        serverBanner: function (_n, seen, silentMs) {
            const since = seen || window.__sinkscopeLoaded || (window.__sinkscopeLoaded = Date.now());
            const quiet = Date.now() - since;
            if (quiet <= silentMs) {
                return ["", true];
            }
            const at = new Date(since).toLocaleTimeString();
            return ["The dashboard server has not answered since " + at + " (" + Math.round(quiet / 1000) +
                    " s): it may have stopped or be overloaded. This page carries on when it answers again; a " +
                    "stream or analysis it was running may be gone by then.", false];
        },
    },
});
