/*
 * The card setup page (/setup/{token}): mounts Stripe.js's card element, confirms the SetupIntent
 * (3-D Secure if the bank asks), then asks the server to read the outcome from Stripe.
 * A file rather than an inline script: the page's Content-Security-Policy runs no inline script.
 * Reads its data (publishable key, client secret) from the JSON block #page-data.
 */
(function () {
  var data = JSON.parse(document.getElementById('page-data').textContent);
  var stripe = Stripe(data.publishable_key);
  var result = document.getElementById('result');
  function show(kind, text) { result.className = kind; result.textContent = text; }
  function finish(stripeResult) {
    show('info', 'Checking with your bank…');
    return fetch(window.location.pathname + '/complete', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}', credentials: 'same-origin'
    }).then(function (resp) { return resp.json(); }).then(function (body) {
      if (body.error) { show('error', body.error.message); return false; }
      if (body.status === 'succeeded' && body.card) {
        show('ok', 'Your card ' + (body.card.brand || '') + ' ending in ' + body.card.last4 + ' is saved.');
        return true;
      }
      var message = body.error_message || (stripeResult.error && stripeResult.error.message) ||
        'Your card could not be saved.';
      show('error', 'Your card was not saved: ' + message);
      return false;
    }, function () { show('error', 'We could not reach the server. Please try again.'); return false; });
  }
  var auth = document.getElementById('authenticate-card');
  if (auth) {
    auth.addEventListener('click', function () {
      auth.disabled = true;
      var step = stripe.handleNextAction ? stripe.handleNextAction({clientSecret: data.client_secret})
                                         : stripe.confirmCardSetup(data.client_secret);
      step.then(finish).then(function (ok) { auth.disabled = ok; });
    });
    return;
  }
  var card = stripe.elements().create('card');
  card.mount('#card-element');
  var form = document.getElementById('setup-form');
  var button = document.getElementById('save-card');
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    button.disabled = true;
    stripe.confirmCardSetup(data.client_secret, {payment_method: {card: card}})
      .then(finish).then(function (ok) { button.disabled = ok; });
  });
})();
