// Copy buttons: the only script of the web UI. Without it the pages work the
// same, the buttons stay hidden and the text can be selected by hand.
"use strict";

function copyFrom(button) {
  var target = document.getElementById(button.getAttribute("data-copy"));
  if (!target || !navigator.clipboard) {
    return;
  }
  navigator.clipboard.writeText(target.textContent).then(function () {
    button.textContent = "Copied";
    window.setTimeout(function () { button.textContent = "Copy"; }, 1500);
  }, function () {
    button.textContent = "Copy failed";
  });
}

document.addEventListener("DOMContentLoaded", function () {
  var buttons = document.querySelectorAll("button[data-copy]");
  for (var i = 0; i < buttons.length; i++) {
    var button = buttons[i];
    button.hidden = false;
    button.addEventListener("click", copyFrom.bind(null, button));
  }
});
