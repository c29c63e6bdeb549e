/*
 * Stripe.js stand-in served by the local Stripe sandbox at {sandbox}/js/v3/stripe.js (or /js/v3/).
 *
 * Implements the part of Stripe.js (https://docs.stripe.com/js) that card pages use:
 *   Stripe(publishableKey)
 *   stripe.elements().create('card').mount(selectorOrElement)     -- a card element
 *   stripe.confirmCardSetup(clientSecret, data?, {handleActions}?)  -> {setupIntent} | {error}
 *   stripe.confirmCardPayment(clientSecret, data?, {handleActions}?) -> {paymentIntent} | {error}
 *   stripe.handleNextAction({clientSecret})   -> {setupIntent} | {paymentIntent} | {error}
 *   stripe.createPaymentMethod({type: 'card', card: element})      -> {paymentMethod} | {error}
 *
 * The card element is one text input (name "cardnumber") that takes either a test card number
 * (spaces and dashes allowed, e.g. "4000 0027 6000 3184"; expiry 12/next year + 1 and CVC 123 are
 * filled in) or a PaymentMethod id such as "pm_card_visa" or an existing "pm_…".
 *
 * Every API call is a form-encoded POST carrying the publishable key as `key` and the client secret
 * as `client_secret` in the body, as Stripe.js sends them, so the client secret never appears in a
 * URL. 3-D Secure (next_action) opens the sandbox's challenge page /_sandbox/3ds/{id}?frame=1 in an
 * iframe overlay (buttons "Complete authentication" / "Fail authentication"); the frame posts the
 * intent back with postMessage. handleNextAction re-confirms the intent (no new payment method) to
 * get a fresh challenge: the sandbox has no separate "next action" endpoint.
 */
(function () {
  'use strict';

  var script = document.currentScript;
  var BASE = script.src.replace(/\/js\/v3\/.*$/, '');
  var ORIGIN = new URL(BASE).origin;

  function flatten(value, prefix, out) {
    if (value === undefined || value === null) return out;
    if (typeof value === 'object') {
      Object.keys(value).forEach(function (k) {
        flatten(value[k], prefix ? prefix + '[' + k + ']' : k, out);
      });
    } else {
      out.append(prefix, String(value));
    }
    return out;
  }

  function post(path, params) {
    return fetch(BASE + path, {
      method: 'POST',
      body: flatten(params, '', new URLSearchParams()),
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
    }).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (body) {
        return {status: resp.status, body: body};
      });
    }, function (err) {
      return {status: 0, body: {error: {type: 'api_connection_error', message: String(err)}}};
    });
  }

  function intentId(clientSecret, prefix) {
    var m = typeof clientSecret === 'string' &&
      new RegExp('^(' + prefix + '_[A-Za-z0-9]+)_secret_').exec(clientSecret);
    return m ? m[1] : null;
  }

  // --- the card element ---------------------------------------------------------------------
  function CardElement(type) {
    this._type = type;
    this._input = null;
    this._listeners = {};
  }
  CardElement.prototype.mount = function (target) {
    var node = typeof target === 'string' ? document.querySelector(target) : target;
    if (!node) throw new Error('mount(): no element matches ' + target);
    if (this._input) throw new Error('This Element is already mounted.');
    var input = document.createElement('input');
    input.type = 'text';
    input.name = 'cardnumber';
    input.autocomplete = 'cc-number';
    input.placeholder = 'Card number or pm_card_…';
    input.setAttribute('data-sandbox-card', '');
    input.style.width = '100%';
    var self = this;
    input.addEventListener('input', function () {
      var value = self._value();
      (self._listeners.change || []).forEach(function (fn) {
        fn({elementType: self._type, empty: !value, complete: /^pm_|^\d{12,19}$/.test(value)});
      });
    });
    node.appendChild(input);
    this._input = input;
    (this._listeners.ready || []).forEach(function (fn) { fn({elementType: self._type}); });
  };
  CardElement.prototype.unmount = function () {
    if (this._input) { this._input.remove(); this._input = null; }
  };
  CardElement.prototype.destroy = CardElement.prototype.unmount;
  CardElement.prototype.focus = function () { if (this._input) this._input.focus(); };
  CardElement.prototype.clear = function () { if (this._input) this._input.value = ''; };
  CardElement.prototype.on = function (event, fn) {
    (this._listeners[event] = this._listeners[event] || []).push(fn);
    return this;
  };
  CardElement.prototype._value = function () {
    var raw = this._input ? this._input.value.trim() : '';
    return /^pm_/.test(raw) ? raw : raw.replace(/[\s-]/g, '');
  };

  function Elements() { this._elements = {}; }
  Elements.prototype.create = function (type) {
    if (type !== 'card') throw new Error('This Stripe.js stand-in supports only the card element.');
    if (this._elements.card) throw new Error('Can only create one Element of type card.');
    return (this._elements.card = new CardElement(type));
  };
  Elements.prototype.getElement = function (type) { return this._elements[type] || null; };

  // A payment_method argument (string id, or {card: element, billing_details}) → API params.
  function paymentMethodParams(pm) {
    if (!pm) return {};
    if (typeof pm === 'string') return {payment_method: pm};
    if (pm.card instanceof CardElement) {
      var value = pm.card._value();
      if (/^pm_/.test(value)) return {payment_method: value};
      return {payment_method_data: {
        type: 'card',
        card: {number: value, exp_month: 12, exp_year: new Date().getFullYear() + 2, cvc: '123'},
        billing_details: pm.billing_details,
      }};
    }
    if (pm.card && typeof pm.card === 'object') {
      return {payment_method_data: {type: 'card', card: pm.card, billing_details: pm.billing_details}};
    }
    return {};
  }

  // --- 3-D Secure -----------------------------------------------------------------------------
  function challengeUrl(intent) {
    var action = intent.next_action || {};
    var path = (action.use_stripe_sdk && action.use_stripe_sdk.stripe_js) ||
      (action.redirect_to_url && action.redirect_to_url.url) || ('/_sandbox/3ds/' + intent.id);
    path = path.split('?')[0];
    return (/^https?:/.test(path) ? path : BASE + path) + '?frame=1';
  }

  function authenticate(intent) {
    return new Promise(function (resolve) {
      var overlay = document.createElement('div');
      overlay.setAttribute('data-sandbox-3ds', intent.id);
      overlay.style.cssText = 'position:fixed;inset:0;background:rgba(0,0,0,.45);display:flex;' +
        'align-items:center;justify-content:center;z-index:2147483647';
      var frame = document.createElement('iframe');
      frame.name = '__sandboxStripe3DS';
      frame.title = '3D Secure authentication';
      frame.src = challengeUrl(intent);
      frame.referrerPolicy = 'no-referrer';
      frame.style.cssText = 'width:420px;height:320px;border:0;background:#fff;border-radius:8px';
      overlay.appendChild(frame);
      document.body.appendChild(overlay);
      function onMessage(event) {
        var data = event.data || {};
        if (event.origin !== ORIGIN || data.type !== 'sandbox-3ds-result' || !data.intent ||
            data.intent.id !== intent.id) return;
        window.removeEventListener('message', onMessage);
        overlay.remove();
        resolve(Object.assign({}, data.intent, {client_secret: intent.client_secret}));
      }
      window.addEventListener('message', onMessage);
    });
  }

  // Stripe.js resolves with the intent when it is done, or with an error that carries it.
  function settle(kind, intent) {
    var key = kind === 'payment' ? 'paymentIntent' : 'setupIntent';
    var lastError = kind === 'payment' ? intent.last_payment_error : intent.last_setup_error;
    var out = {};
    if (intent.status === 'requires_payment_method' && lastError) {
      var error = Object.assign({}, lastError);
      error[kind === 'payment' ? 'payment_intent' : 'setup_intent'] = intent;
      out.error = error;
    } else {
      out[key] = intent;
    }
    return out;
  }

  function confirm(apiKey, kind, clientSecret, data, options) {
    var prefix = kind === 'payment' ? 'pi' : 'seti';
    var id = intentId(clientSecret, prefix);
    if (!id) {
      return Promise.resolve({error: {type: 'invalid_request_error', code: 'invalid_client_secret',
                                      message: 'Invalid value for client secret.'}});
    }
    data = data || {};
    var params = Object.assign({key: apiKey, client_secret: clientSecret}, paymentMethodParams(data.payment_method));
    if (kind === 'payment' && data.setup_future_usage) params.setup_future_usage = data.setup_future_usage;
    var path = '/v1/' + (kind === 'payment' ? 'payment_intents/' : 'setup_intents/') + id + '/confirm';
    return post(path, params).then(function (res) {
      if (res.status !== 200 || res.body.error) return {error: res.body.error || {message: 'request failed'}};
      var intent = res.body;
      if (intent.status === 'requires_action' && !(options && options.handleActions === false)) {
        return authenticate(intent).then(function (done) { return settle(kind, done); });
      }
      return settle(kind, intent);
    });
  }

  function Stripe(key) {
    if (!(this instanceof Stripe)) return new Stripe(key);
    if (typeof key !== 'string' || !/^pk_/.test(key)) {
      throw new Error('Stripe(): a publishable key (pk_…) is required.');
    }
    this._key = key;
  }
  Stripe.prototype.elements = function () { return new Elements(); };
  Stripe.prototype.confirmCardSetup = function (clientSecret, data, options) {
    return confirm(this._key, 'setup', clientSecret, data, options);
  };
  Stripe.prototype.confirmCardPayment = function (clientSecret, data, options) {
    return confirm(this._key, 'payment', clientSecret, data, options);
  };
  Stripe.prototype.handleNextAction = function (options) {
    var secret = options && options.clientSecret;
    var kind = intentId(secret, 'seti') ? 'setup' : 'payment';
    return confirm(this._key, kind, secret, {}, {});
  };
  Stripe.prototype.createPaymentMethod = function (data) {
    var params = paymentMethodParams({card: data && data.card, billing_details: data && data.billing_details});
    if (params.payment_method) return Promise.resolve({paymentMethod: {id: params.payment_method}});
    var body = Object.assign({key: this._key}, params.payment_method_data || {type: 'card'});
    return post('/v1/payment_methods', body).then(function (res) {
      return res.status === 200 ? {paymentMethod: res.body} : {error: res.body.error};
    });
  };

  window.Stripe = Stripe;
})();
